"""Megatron distributed checkpoints: atomic save, resharding load, resume metadata.

    save(model, optimizer, {"step": 100, ...}, "ckpt/step_100", hf_assets=hf_dir)
    extra = load(model, optimizer, "ckpt/step_100")      # any TP/PP/EP layout

Layout of a checkpoint directory:
    <Megatron torch_dist files>   sharded tensors (.distcp + .metadata), common.pt,
                                  metadata.json; keys are Megatron's global sharded keys,
                                  so the checkpoint loads under any TP/PP/EP (vocab rows
                                  beyond a smaller padding are dropped, extra ones zeroed)
    openr1_checkpoint.json        what wrote it: arch, vocab sizes, layout, dtype
    hf/                           config.json (+ tokenizer files when given), so that
                                  `convert_checkpoint.py mcore-to-hf` can export it

State dict: {"model": ..., "optimizer": ... (if any), "extra_state": dict}. `extra_state`
is common state (rank 0's copy is stored): step, consumed samples, config, ...

Atomicity: everything is written into a hidden sibling directory, then renamed onto
`path` by rank 0 after a barrier; an existing `path` is replaced only with
`overwrite=True` (moved aside, replaced, then deleted). A crash leaves at worst a hidden
`.<name>.tmp-*` directory, never a half-written `path`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing

from openr1_mega.checkpoint.safetensors_io import copy_hf_assets
from openr1_mega.config.schema import ArchConfig
from openr1_mega.config.to_megatron import precision_name
from openr1_mega.models.build import model_arch, unwrap

INFO_FILE = "openr1_checkpoint.json"
HF_SUBDIR = "hf"
FORMAT = "openr1-mega/megatron-dist"


def save(model, optimizer, extra_state: dict[str, Any], path: str | Path, *,
         hf_assets: str | Path | None = None, overwrite: bool = False) -> Path:
    """Save model (+ optimizer) shards and `extra_state` to `path` (collective, atomic)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tmp = _shared_tmp_dir(path)
    state = {"model": unwrap(model).sharded_state_dict(), "extra_state": dict(extra_state)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"])
    dist_checkpointing.save(state, str(tmp))
    if dist.get_rank() == 0:
        gpt = unwrap(model)
        write_info(tmp, model_arch(model), gpt.vocab_size, _layout(gpt),
                   precision_name(gpt.config.params_dtype), hf_assets)
    dist.barrier()
    if dist.get_rank() == 0:
        publish(tmp, path, overwrite)
    dist.barrier()
    return path


def load(model, optimizer, path: str | Path, *, strict: bool = True) -> dict[str, Any]:
    """Load `path` into `model` (+ `optimizer`) for this rank's layout; returns extra_state."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path}: not a Megatron distributed checkpoint")
    gpt = unwrap(model)
    state = {"model": gpt.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True)
    loaded = dist_checkpointing.load(state, str(path))
    gpt.load_state_dict(loaded["model"], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return loaded.get("extra_state", {})


def write_info(ckpt_dir: Path, arch: ArchConfig, padded_vocab: int, layout: dict, dtype: str,
               hf_assets: str | Path | None) -> None:
    """Write openr1_checkpoint.json and hf/ (config.json from the arch, assets if given)."""
    hf_dir = Path(ckpt_dir) / HF_SUBDIR
    if hf_assets is not None:
        copy_hf_assets(hf_assets, hf_dir)
    else:
        hf_dir.mkdir(parents=True, exist_ok=True)
        (hf_dir / "config.json").write_text(json.dumps(arch.hf_config, indent=2))
    info = {"format": FORMAT, "version": 1, "arch": arch.arch, "vocab_size": arch.vocab_size,
            "padded_vocab_size": padded_vocab, "layout": layout, "dtype": dtype,
            "hf_assets": HF_SUBDIR}
    (Path(ckpt_dir) / INFO_FILE).write_text(json.dumps(info, indent=2))


def read_info(ckpt_dir: str | Path) -> dict:
    """The openr1_checkpoint.json of a checkpoint directory."""
    file = Path(ckpt_dir) / INFO_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no {INFO_FILE} (not written by openr1-mega)")
    return json.loads(file.read_text())


def tmp_dir_for(path: Path) -> Path:
    """A fresh hidden sibling of `path` to write into before `publish`."""
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` onto `path`, replacing it only if `overwrite`."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)


def _shared_tmp_dir(path: Path) -> Path:
    names = [str(tmp_dir_for(path))] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(names, src=0)
    tmp = Path(names[0])
    if dist.get_rank() == 0:
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


def _layout(gpt) -> dict:
    c = gpt.config
    return {"tp": c.tensor_model_parallel_size, "pp": c.pipeline_model_parallel_size,
            "ep": c.expert_model_parallel_size, "etp": c.expert_tensor_parallel_size,
            "cp": c.context_parallel_size}
