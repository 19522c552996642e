"""Megatron dist checkpoints: save under one layout, load under another, export to HF.

In one 2-rank gloo world: a dense model saved at TP=2 loads at TP=1 (DP=2) and back; a
MoE model (tied, shared expert) saved at EP=2 loads at TP=2 and back. Each load goes into
a freshly initialised (random) model and must reproduce transformers' logits, and the
reloaded models export (iter_hf_tensors) the original HF tensors bit for bit. Then the
dense TP=2 "training" checkpoint is exported with `convert_checkpoint.py mcore-to-hf`
and must equal the original HF tensors bit for bit too.

A training run's checkpoint root (2 ranks, through train/policy.py save/resume): `latest`
names the newest committed step and retention keeps the last K; a hidden temp directory
(a killed write) and a step directory newer than `latest` (killed before the commit) are
never picked; a truncated shard is reported with its path and the previous checkpoint is
loaded instead, weights and RNG states as they were saved.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests._dist import run_world
from tests._mcore_helpers import (
    assert_logits_close,
    assert_same_tensors,
    batch,
    hf_logits,
    hf_tensors,
    run_megatron,
    tiny,
)

ROOT = Path(__file__).resolve().parents[1]
CASES = [("qwen2", False, {"tp": 2}, {}), ("qwen2_moe", True, {"ep": 2}, {"tp": 2})]


def _all_cases(rank, world, cases, input_ids):
    return [_save_and_reshard(hf_dir, root, a, b, input_ids) for hf_dir, root, a, b in cases]


def _save_and_reshard(hf_dir, root, layout_a, layout_b, input_ids):
    from openr1_mega.checkpoint import dist as dist_ckpt

    a = run_megatron(hf_dir, layout_a, input_ids, export=False)
    dist_ckpt.save(a["model"], None, {"step": 7, "samples": [1, 2]}, root / "a",
                   hf_assets=hf_dir)
    try:
        dist_ckpt.save(a["model"], None, {}, root / "a")
        refused = False
    except FileExistsError:
        refused = True
    b = run_megatron(hf_dir, layout_b, input_ids, source=root / "a")
    dist_ckpt.save(b["model"], None, {"step": 8}, root / "b")
    dist_ckpt.save(b["model"], None, {"step": 9}, root / "b", overwrite=True)
    a2 = run_megatron(hf_dir, layout_a, input_ids, source=root / "b", export=False)
    return {"logits": [x["logits"] for x in (a, b, a2)], "extra": [b["extra"], a2["extra"]],
            "export": b["export"], "refused": refused}


@pytest.mark.slow
def test_save_at_one_layout_load_at_another(tmp_path):
    ids = batch()
    cases = [(tiny(tmp_path, arch, tied), tmp_path / f"ckpt_{arch}", a, b)
             for arch, tied, a, b in CASES]
    ranks = run_world(_all_cases, cases, ids, world_size=2)
    for i, (hf_dir, ckpt, layout_a, _) in enumerate(cases):
        want, arch = hf_logits(hf_dir, ids), CASES[i][0]
        for rank in ranks:
            for name, logits in zip(("saved", "loaded", "reloaded"), rank[i]["logits"]):
                if logits is not None:
                    assert_logits_close(logits, want, f"{arch} {name}")
            assert rank[i]["extra"] == [{"step": 7, "samples": [1, 2]}, {"step": 9}]
            assert rank[i]["refused"]
        assert_same_tensors(ranks[0][i]["export"], hf_tensors(hf_dir), f"{arch} reloaded")
        info = json.loads((ckpt / "a" / "openr1_checkpoint.json").read_text())
        assert info["layout"]["tp"] == layout_a.get("tp", 1) and info["arch"] == arch
        assert (ckpt / "a" / "hf" / "tokenizer.json").exists()
        assert sorted(p.name for p in ckpt.iterdir()) == ["a", "b"]  # no temp/old dirs left
    hf_dir, ckpt = cases[0][0], cases[0][1]
    cmd = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "mcore-to-hf",
           "--mcore", str(ckpt / "a"), "--out", str(tmp_path / "export"), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert_same_tensors(hf_tensors(tmp_path / "export"), hf_tensors(hf_dir), "TP=2 export")


def _run_root(rank, world, hf_dir, out):
    import torch

    from openr1_mega.checkpoint import dist as dist_ckpt
    from openr1_mega.config.train import RunConfig
    from openr1_mega.train import policy

    model = run_megatron(hf_dir, {"tp": 2}, batch(), export=False)["model"]
    ctx = SimpleNamespace(model=model, optimizer=None, is_rank0=rank == 0)
    run = RunConfig(output_dir=str(out), keep_checkpoints=2, seed=5)
    root = out / "checkpoints"
    param = next(model.parameters())
    saved = {}
    for step in range(1, 5):
        with torch.no_grad():
            param.add_(1.0)
        policy.save(ctx, run, step)
        saved[step] = (param.detach().clone(), torch.get_rng_state())
        torch.rand(7)  # the RNG moves on after the save
    listing = sorted(p.name for p in root.iterdir())
    torch.distributed.barrier()  # every rank has listed before rank 0 adds the broken ones
    if rank == 0:  # a killed write, and a write killed between its rename and the commit
        shutil.copytree(root / "step_000004", root / ".step_000005.tmp-0123456789abcdef")
        shutil.copytree(root / "step_000004", root / "step_000005")
        (root / "step_000005" / "manifest.json").unlink()
        shard = next((root / "step_000004").glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])  # truncated: step 4 is corrupt
    torch.distributed.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = policy.resume(ctx, run)
    return {"listing": listing, "step": step,
            "param_restored": torch.equal(param, saved[3][0]),
            "rng_restored": torch.equal(torch.get_rng_state(), saved[3][1]),
            "warnings": [str(w.message) for w in caught if "corrupt" in str(w.message)],
            "shard": str(shard) if rank == 0 else None,
            "latest": dist_ckpt.latest_step(root)}


@pytest.mark.slow
def test_latest_retention_and_resume_past_interrupted_and_corrupt(tmp_path):
    hf_dir = tiny(tmp_path, "qwen2", False)
    out = tmp_path / "run"
    ranks = run_world(_run_root, hf_dir, out, world_size=2)
    for rank in ranks:
        assert rank["listing"] == ["latest", "step_000003", "step_000004"]  # keep_checkpoints=2
        assert rank["step"] == 3 and rank["param_restored"] and rank["rng_restored"]
        assert rank["latest"] == 4
    corrupt = ranks[0]["warnings"]
    assert len(corrupt) == 1 and str(out / "checkpoints" / "step_000004") in corrupt[0]
    assert ranks[0]["shard"] in corrupt[0]  # the truncated file is named


def test_verify_names_truncated_and_missing_files(tmp_path):
    from openr1_mega.checkpoint.dist import verify, write_manifest

    ckpt = tmp_path / "step_000001"
    (ckpt / "hf").mkdir(parents=True)
    (ckpt / "a.distcp").write_bytes(b"x" * 100)
    (ckpt / "hf" / "config.json").write_text("{}")
    files = ["a.distcp", "hf/config.json"]
    write_manifest(ckpt, files, [hashlib.sha256((ckpt / f).read_bytes()).hexdigest()
                                 for f in files])
    assert verify(ckpt) == []
    (ckpt / "a.distcp").write_bytes(b"y" * 100)  # same size, other bytes
    assert verify(ckpt) == [f"{ckpt / 'a.distcp'}: sha256 differs from the manifest"]
    (ckpt / "a.distcp").write_bytes(b"x" * 10)
    (ckpt / "hf" / "config.json").unlink()
    assert verify(ckpt) == [f"{ckpt / 'a.distcp'}: 10 bytes, manifest says 100",
                            f"{ckpt / 'hf' / 'config.json'}: missing"]
    (ckpt / "manifest.json").unlink()
    assert "unreadable manifest" in verify(ckpt)[0]
