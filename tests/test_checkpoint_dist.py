"""Megatron dist checkpoints: save under one layout, load under another, export to HF.

In one 2-rank gloo world: a dense model saved at TP=2 loads at TP=1 (DP=2) and back; a
MoE model (tied, shared expert) saved at EP=2 loads at TP=2 and back. Each load goes into
a freshly initialised (random) model and must reproduce transformers' logits, and the
reloaded models export (iter_hf_tensors) the original HF tensors bit for bit. Then the
dense TP=2 "training" checkpoint is exported with `convert_checkpoint.py mcore-to-hf`
and must equal the original HF tensors bit for bit too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
