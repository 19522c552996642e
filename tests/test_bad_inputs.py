"""Bad input gets a clear error or is skipped and counted; nothing else is lost (issue 13, §2).

Each case builds the bad input for real (files on disk, real datasets, real models) and
checks both halves: what is reported (file, row, field) and that the good data still
comes through. Rewards that raise or hang are in test_rewards_limits.py, non-finite
training steps in test_train_guard.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openr1_mega.config.load import from_dict
from openr1_mega.config.train import DataConfig, SftConfig
from openr1_mega.data.prompts import (
    MAX_ROW_BYTES,
    SHOWN_BAD_ROWS,
    BadRowError,
    load_rows,
    read_checked_rows,
)
from openr1_mega.eval.__main__ import read_completions
from openr1_mega.eval.sources import read_rows

ROOT = Path(__file__).resolve().parents[1]

GOOD = {"id": "p", "problem": "1+1?", "answer": "2"}


def _jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _good(i: int) -> bytes:
    return json.dumps({**GOOD, "id": f"p{i}"}).encode()


BAD_LINES = {  # line content -> the words that must name its problem
    "missing answer": (json.dumps({"problem": "x"}).encode(), "'answer': missing or empty"),
    "empty problem": (json.dumps({"problem": "  ", "answer": "1"}).encode(),
                      "'problem': missing or empty"),
    "null answer": (json.dumps({"problem": "x", "answer": None}).encode(),
                    "'answer': missing or empty"),
    "wrong type": (json.dumps({"problem": ["x"], "answer": "1"}).encode(),
                   "'problem': expected a string or number, got list"),
    "boolean answer": (json.dumps({"problem": "x", "answer": True}).encode(),
                       "'answer': expected a string or number, got bool"),
    "non-utf8": (b'{"problem": "caf\xe9", "answer": "1"}', "not UTF-8"),
    "malformed json": (b'{"problem": "x", "answer": ', "not valid JSON"),
    "not an object": (b'["x", "1"]', "expected a JSON object, got list"),
    "10 MB row": (json.dumps({"problem": "x" * (10 << 20), "answer": "1"}).encode(),
                  "over the"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_jsonl_row_is_skipped_and_counted(tmp_path, caplog, case):
    bad, words = BAD_LINES[case]
    path = _jsonl(tmp_path / "rows.jsonl", [_good(0), bad, _good(2)])
    with caplog.at_level(logging.WARNING, logger="openr1_mega.data.prompts"):
        rows = load_rows(str(path))
    assert [r["id"] for r in rows] == ["p0", "p2"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "skipped 1 bad row(s) of 3" in warnings[0] and "line 2" in warnings[0]
    assert words in warnings[0]


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_jsonl_row_is_an_error_when_the_recipe_says_so(tmp_path, case):
    bad, words = BAD_LINES[case]
    path = _jsonl(tmp_path / "rows.jsonl", [_good(0), bad])
    with pytest.raises(BadRowError) as err:
        load_rows(str(path), on_bad_row="error")
    assert str(path) in str(err.value) and "line 2" in str(err.value)
    assert words in str(err.value)


def test_warning_lists_the_first_few_rows_once_per_file(tmp_path, caplog):
    lines = [_good(0)] + [b"{oops"] * 9 + [_good(10)]
    path = _jsonl(tmp_path / "rows.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="openr1_mega.data.prompts"):
        rows = load_rows(str(path))
    assert len(rows) == 2
    (message,) = [r.getMessage() for r in caplog.records]
    assert "skipped 9 bad row(s) of 11" in message
    assert [f"line {i}" in message for i in range(2, 12)] == \
        [True] * SHOWN_BAD_ROWS + [False] * (10 - SHOWN_BAD_ROWS)


def test_n_counts_good_rows_only(tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", [b"{oops", _good(1), b"", _good(3), _good(4)])
    rows, bad = read_checked_rows(str(path), n=2)
    assert [r["id"] for r in rows] == ["p1", "p3"] and bad.count == 1


def test_hf_dataset_dir_rows_are_checked(tmp_path, caplog):
    import datasets

    data = datasets.Dataset.from_list([GOOD, {"id": "q", "problem": "", "answer": "3"}, GOOD])
    data.save_to_disk(str(tmp_path / "ds"))
    with caplog.at_level(logging.WARNING, logger="openr1_mega.data.prompts"):
        assert len(load_rows(str(tmp_path / "ds"))) == 2
    assert "row 1 (field 'problem': missing or empty)" in caplog.records[0].getMessage()
    with pytest.raises(BadRowError, match=r"ds row 1: field 'problem': missing or empty"):
        load_rows(str(tmp_path / "ds"), on_bad_row="error")


def test_sft_conversations_are_checked(tmp_path):
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    lines = [json.dumps({"messages": conversation}).encode(),
             json.dumps({"messages": []}).encode(),
             json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(),
             json.dumps({"messages": "hi"}).encode()]
    path = _jsonl(tmp_path / "sft.jsonl", lines)
    rows, bad = read_checked_rows(str(path), required=(), conversation_fields=("messages",))
    assert rows == [{"messages": conversation}] and bad.count == 3
    with pytest.raises(BadRowError, match=r"line 2: field 'messages': expected a non-empty"):
        load_rows(str(path), required=(), conversation_fields=("messages",),
                  on_bad_row="error")


def test_on_bad_row_is_validated_at_load_time():
    assert from_dict(DataConfig, {"on_bad_row": "error"}).on_bad_row == "error"
    with pytest.raises(ValueError, match=r"data.on_bad_row='drop': expected skip or error"):
        from_dict(DataConfig, {"on_bad_row": "drop"})
    with pytest.raises(ValueError, match=r"sft.on_bad_row='x'"):
        from_dict(SftConfig, {"on_bad_row": "x"})


def test_row_limit_is_large_enough_for_long_traces():
    assert MAX_ROW_BYTES >= 1 << 20  # 32k-token reasoning traces are ~150 KB


def test_malformed_completions_line_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "gens.jsonl", [json.dumps({"id": "1", "completion": "a"}).encode(),
                                            b'{"id": "2", "completion": "b"',
                                            json.dumps({"id": "3", "completion": "c"}).encode()])
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        read_completions(path, ["math500"])
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        read_rows(path)


def test_malformed_json_file_names_the_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"id": 1},')
    with pytest.raises(ValueError, match=rf"{path}: not a UTF-8 JSON document"):
        read_rows(path)


# ---- files: model directories, safetensors, tokenizers ---------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from openr1_mega.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen3")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_model_dir_is_named(tmp_path):
    from openr1_mega.checkpoint.model_dir import load_tokenizer

    with pytest.raises(FileNotFoundError, match=rf"model directory {tmp_path}/nope does not"):
        load_tokenizer(tmp_path / "nope")


def test_model_dir_without_config_is_named(tiny_dir, tmp_path):
    from openr1_mega.checkpoint.model_dir import check_model_dir

    model = _copy(tiny_dir, tmp_path / "m")
    (model / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{model}/config.json is missing"):
        check_model_dir(model)


def _sharded(tiny_dir, out):
    """The tiny model re-written as several shards with an index."""
    from openr1_mega.checkpoint.safetensors_io import HFReader, HFWriter, copy_hf_assets

    reader = HFReader(tiny_dir)
    names = reader.names()
    writer = HFWriter(out, [(n, reader.shape(n), reader.dtype(n)) for n in names],
                      max_shard_bytes=200_000)
    for n in names:
        writer.add(n, reader.get(n))
    writer.close()
    copy_hf_assets(tiny_dir, out)
    return out


def test_missing_shard_is_named(tiny_dir, tmp_path):
    from openr1_mega.checkpoint.model_dir import check_model_dir
    from openr1_mega.checkpoint.safetensors_io import HFReader

    model = _sharded(tiny_dir, tmp_path / "sharded")
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 2 and check_model_dir(model)["vocab_size"] > 0
    shards[1].unlink()
    for load in (check_model_dir, HFReader):
        with pytest.raises(FileNotFoundError, match=rf"index.json names shard\(s\) that are "
                                                    rf"absent: \['{shards[1].name}'\]"):
            load(model)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_safetensors_is_named(tiny_dir, tmp_path, keep):
    from openr1_mega.checkpoint.model_dir import check_model_dir

    model = _copy(tiny_dir, tmp_path / "m")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=rf"{weights}: truncated safetensors file"):
        check_model_dir(model)


def test_tokenizer_larger_than_the_vocab_is_named(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from openr1_mega.checkpoint.model_dir import load_tokenizer

    model = _copy(tiny_dir, tmp_path / "m")
    assert len(load_tokenizer(model)) == json.loads((model / "config.json").read_text())[
        "vocab_size"]
    other = AutoTokenizer.from_pretrained(model)
    other.add_tokens([f"<extra_{i}>" for i in range(7)])
    other.save_pretrained(model)
    with pytest.raises(ValueError, match=r"tokenizer.json: the tokenizer has \d+ tokens but "
                                         r"config.json gives vocab_size=\d+"):
        load_tokenizer(model)


def test_policy_setup_names_a_missing_model_before_any_process_group(tmp_path):
    import torch.distributed as dist

    from openr1_mega.config.schema import ModelConfig
    from openr1_mega.train import policy
    from openr1_mega.train.grpo import GrpoRecipe

    recipe = GrpoRecipe(model=ModelConfig(path=str(tmp_path / "missing-model")))
    with pytest.raises(FileNotFoundError, match="missing-model does not exist"):
        policy.setup(recipe)
    assert not dist.is_initialized()


# ---- problems that do not fit the teacher's context ------------------------------------


def test_eval_lists_every_problem_that_does_not_fit():
    from openr1_mega.eval.run import clamp_max_tokens

    prompts = [[1] * 5, [1] * 12, [1] * 3, [1] * 10, [1] * 20]
    with pytest.raises(ValueError) as err:
        clamp_max_tokens(100, 10, prompts, ["a", "b", "c", "d", "e"])
    assert "3 of 5 problem(s) have a prompt that does not fit max_model_len=10" in str(err.value)
    assert "'b' (12 tokens), 'd' (10 tokens), 'e' (20 tokens)" in str(err.value)
    assert clamp_max_tokens(100, 10, prompts[:1] + prompts[2:3], ["a", "c"]) == 5


def test_distill_skips_rows_without_a_problem(tmp_path, caplog):
    from openr1_mega.distill.generate import GenerateConfig, load_problems

    rows = [{"id": "a", "problem": "1+1?", "answer": "2"}, {"id": "b", "answer": "3"},
            {"id": "c", "problem": ["x"]}, {"id": "d", "problem": 7, "answer": "7"}]
    path = _jsonl(tmp_path / "p.jsonl", [json.dumps(r).encode() for r in rows])
    with caplog.at_level(logging.WARNING, logger="openr1_mega.data.prompts"):
        problems = load_problems(GenerateConfig(teacher="t", dataset=str(path), output_dir="o"))
    assert [(p["id"], p["problem"]) for p in problems] == [("a", "1+1?"), ("d", "7")]
    assert "skipped 2 bad row(s) of 4; first: row 1 (field 'problem': missing or empty); " \
           "row 2" in caplog.records[0].getMessage()


@pytest.mark.slow
def test_distill_skips_problems_that_do_not_fit_and_counts_them(tiny_dir, tmp_path):
    import subprocess
    import sys

    import pyarrow.parquet as pq

    problems = [{"id": f"q{i}", "problem": ("long " * 400 if i in (1, 4) else f"{i}+{i}?"),
                 "answer": str(2 * i)} for i in range(6)]
    dataset = tmp_path / "problems.jsonl"
    dataset.write_text("".join(json.dumps(p) + "\n" for p in problems))
    out = tmp_path / "traces"
    generate = [sys.executable, "-m", "openr1_mega.distill", "generate", "--teacher",
                str(tiny_dir), "--dataset", str(dataset), "--output", str(out), "--n", "2",
                "--shard-size", "4", "--max-new-tokens", "16", "--max-model-len", "256",
                "--kv-cache-gib", "0.125", "--dtype", "float32"]
    run = subprocess.run(generate, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "shard 0: 1 problem(s) do not fit max_model_len=256 and are skipped: q1" in run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["skipped_problems"] == {"too_long": 2}
    assert manifest["skipped_problem_ids"] == {"too_long": ["q1", "q4"]}
    ids = pq.read_table(out / "data").column("problem_id").to_pylist()
    assert sorted(ids) == sorted(f"q{i}" for i in (0, 2, 3, 5) for _ in range(2))
    rerun = subprocess.run(generate, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]  # a restart accepts the skipped ids
    filtered = subprocess.run([sys.executable, "-m", "openr1_mega.distill", "filter", "--input",
                               str(out), "--output", str(tmp_path / "kept"), "--workers", "1"],
                              capture_output=True, text=True, timeout=600, check=False)
    assert filtered.returncode == 0, filtered.stderr[-3000:]
    report = json.loads((tmp_path / "kept" / "filter_report.json").read_text())
    assert report["skipped_problems"] == {"too_long": 2} and report["total"] == 8


# ---- vLLM: a failed generation names its batch ----------------------------------------


def _generation_error(model_dir: str) -> dict:
    """Run in a fresh process: an in-process vLLM engine sets up torch.distributed, which
    must not leak into the pytest process (later tests check that none exists)."""
    from openr1_mega.rl.rollout import EngineConfig, RolloutEngine
    from openr1_mega.rl.types import RolloutError, SamplingConfig

    engine = RolloutEngine(model_dir, EngineConfig(dtype="float32", kv_cache_bytes=64 * 2**20,
                                                   max_model_len=128))
    sampling = SamplingConfig(n=2, temperature=0.7, top_p=0.9, max_tokens=8, seed=3)
    good = len(engine.generate([[5, 6, 7]], sampling))
    try:  # the second prompt is longer than the context
        engine.generate([[5, 6, 7], [5] * 300], sampling, step=4, indices=[10, 11])
        raised = None
    except RolloutError as err:
        raised = err
    return {"good": good, "message": str(raised), "cause": str(raised.__cause__),
            "cause_is_exception": isinstance(raised.__cause__, Exception),
            "after": len(engine.generate([[5, 6, 7]], sampling))}


@pytest.mark.slow
def test_generation_error_names_the_batch(tiny_dir):
    code = ("import json, sys; from tests.test_bad_inputs import _generation_error; "
            "print('RESULT ' + json.dumps(_generation_error(sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["good"] == 2 and result["after"] == 2  # the engine still works
    message = result["message"]
    assert "batch of 2 prompt(s) at step 4" in message
    assert "[10:3, 11:300]" in message and "longest 300" in message
    assert "n=2 temperature=0.7 top_p=0.9 max_tokens=8 seed=3" in message
    assert result["cause_is_exception"] and result["cause"] in message


def test_out_of_memory_message_says_what_to_lower():
    import torch

    from openr1_mega.rl.rollout import describe_failure
    from openr1_mega.rl.types import SamplingConfig

    text = describe_failure(torch.OutOfMemoryError("CUDA out of memory"), [[1] * 7] * 20,
                            list(range(20)), SamplingConfig(n=8), step=2)
    assert "OutOfMemoryError: CUDA out of memory" in text and "... 4 more" in text
    assert "total 140 tokens" in text and "out of memory: lower" in text


# ---- W&B ---------------------------------------------------------------------------------


def test_wandb_starts_when_a_project_is_set_without_a_run_name(tmp_path):
    from openr1_mega.utils.logging import wandb_init_kwargs

    out = tmp_path / "grpo-run"
    assert wandb_init_kwargs(out, env={}) is None
    assert wandb_init_kwargs(out, env={"WANDB_PROJECT": "r1"}) == {
        "project": "r1", "name": "grpo-run", "dir": str(out)}
    assert wandb_init_kwargs(out, project="p", env={"WANDB_NAME": "n"})["name"] == "n"
    assert wandb_init_kwargs(out, env={"WANDB_PROJECT": "r1", "WANDB_MODE": "disabled"}) is None


def test_metrics_logger_with_a_project_set_never_breaks(tmp_path, monkeypatch):
    import importlib.util

    from openr1_mega.utils.logging import MetricsLogger, read_metrics

    monkeypatch.setenv("WANDB_PROJECT", "openr1-mega-test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(tmp_path / "run")
    log.log(1, {"loss": 0.5, "grad_norm": float("nan")})
    log.close()
    assert read_metrics(log.path) == [{"step": 1, "loss": 0.5, "grad_norm": "nan"}]
    installed = importlib.util.find_spec("wandb") is not None
    assert (log.wandb is not None) == installed
    if installed:  # offline: the run is written under the output directory, no network
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
