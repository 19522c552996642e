"""Check that an HF model directory is whole before anything loads it.

Loading a broken directory fails deep inside another library with a message that names
neither the directory nor the file: a missing path reaches the hub client ("Repo id must
use alphanumeric chars"), a truncated shard the safetensors decoder ("incomplete
metadata"). `check_model_dir` reads only config.json and the safetensors headers (a few
KB per shard) and says which file is missing, truncated or corrupt; `load_tokenizer` also
checks that the tokenizer fits the model's vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openr1_mega.checkpoint.safetensors_io import INDEX, HFReader

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def check_model_dir(model_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a model directory whose weights are all present and whole.

    Raises:
        FileNotFoundError: the directory, config.json or a shard named by the index is absent.
        ValueError: config.json or a safetensors file is corrupt or truncated (file named).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist (a local HF "
                                "model directory is expected)")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: {model_dir} is not an HF model "
                                "directory")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or not isinstance(config.get("vocab_size"), int):
        raise ValueError(f"{config_path}: needs an integer vocab_size")
    if _has_safetensors(model_dir) or not any(model_dir.glob("*.bin")):
        HFReader(model_dir)  # every shard exists and its header and extent are whole
    return config


def _has_safetensors(model_dir: Path) -> bool:
    return (model_dir / INDEX).is_file() or any(model_dir.glob("*.safetensors"))


def check_tokenizer_vocab(tokenizer: Any, vocab_size: int, model_dir: str | Path) -> None:
    """The tokenizer's ids must all be rows of the model's embedding (vocab_size).

    The embedding may be padded beyond the tokenizer (Qwen's 151936 vs 151665 tokens); the
    other way round, token ids past the embedding would index out of range mid-run.
    """
    size = len(tokenizer)
    if size > vocab_size:
        raise ValueError(f"{_tokenizer_file(Path(model_dir))}: the tokenizer has {size} tokens "
                         f"but config.json gives vocab_size={vocab_size}: it does not belong "
                         "to this model")


def load_tokenizer(model_dir: str | Path) -> Any:
    """The checked directory's tokenizer, checked against its vocab_size."""
    from transformers import AutoTokenizer

    config = check_model_dir(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:  # re-raised with the directory named
        raise ValueError(f"{model_dir}: cannot load the tokenizer "
                         f"({type(err).__name__}: {err})") from err
    check_tokenizer_vocab(tokenizer, config["vocab_size"], model_dir)
    return tokenizer


def _tokenizer_file(model_dir: Path) -> Path:
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    return model_dir
