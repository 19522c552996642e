"""Offline conversion: HF -> Megatron dist checkpoint -> HF is bit-exact, atomic, streaming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openr1_mega.checkpoint.safetensors_io import INDEX, HFReader, HFWriter
from tests._dist import run_world
from tests._mcore_helpers import ARCHS, assert_same_tensors, hf_tensors, tiny

ROOT = Path(__file__).resolve().parents[1]


def test_writer_shards_and_reader_reads_back(tmp_path):
    tensors = {f"t{i}": torch.randn(3, 5 + i).to(torch.bfloat16 if i % 2 else torch.float32)
               for i in range(5)}
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = HFWriter(tmp_path / "out", plan, max_shard_bytes=50)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    # any two tensors exceed 50 bytes: one tensor per shard
    assert len(set(index["weight_map"].values())) == 5
    reader = HFReader(tmp_path / "out")
    for name, t in tensors.items():
        assert reader.dtype(name) == t.dtype and torch.equal(reader.get(name), t)
    wrong = HFWriter(tmp_path / "wrong", plan)
    with pytest.raises(ValueError, match="expected tensor"):
        wrong.add("t1", tensors["t1"])


def _round_trips(rank, world, cases, root):
    from openr1_mega.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from openr1_mega.checkpoint.dist import read_info
    from openr1_mega.config import ParallelConfig

    out = []
    for name, hf_dir, layout in cases:
        mcore = hf_to_mcore(hf_dir, root / name / "mcore", ParallelConfig(**layout),
                            progress=False)
        refused = False
        try:
            hf_to_mcore(hf_dir, mcore, ParallelConfig(**layout), progress=False)
        except FileExistsError:
            refused = True
        hf_to_mcore(hf_dir, mcore, ParallelConfig(**layout), progress=False, force=True)
        back = mcore_to_hf(mcore, root / name / "hf", progress=False)
        bf16 = mcore_to_hf(mcore, root / name / "hf_bf16", dtype="bf16", progress=False,
                           max_shard_bytes=200_000)
        out.append({"refused": refused, "info": read_info(mcore), "back": str(back),
                    "bf16": str(bf16)})
    return out


def test_hf_to_mcore_to_hf_is_bit_exact(tmp_path):
    cases = [(arch, tiny(tmp_path, arch, tied=arch.startswith("qwen3")),
              {"tp": 2} if arch != "qwen3_moe" else {"ep": 2}) for arch in ARCHS]
    results = run_world(_round_trips, cases, tmp_path / "conv", world_size=1)[0]
    for (arch, hf_dir, layout), res in zip(cases, results):
        original = hf_tensors(hf_dir)
        assert_same_tensors(hf_tensors(Path(res["back"])), original, arch)
        bf16 = HFReader(res["bf16"])
        assert (Path(res["bf16"]) / INDEX).exists()  # small shards -> sharded + index
        for name, value in original.items():
            want = torch.from_numpy(value).to(torch.bfloat16)
            assert torch.equal(bf16.get(name), want), f"{arch} bf16 {name}"
        assert json.loads((Path(res["bf16"]) / "config.json").read_text())["dtype"] == "bfloat16"
        assert res["refused"]
        info = res["info"]
        assert info["arch"] == arch and info["vocab_size"] == 393
        assert info["padded_vocab_size"] == 512 and info["layout"]["tp"] == layout.get("tp", 1)
        mcore = Path(res["back"]).parent / "mcore"
        assert (mcore / "hf" / "tokenizer.json").exists()
        assert sorted(p.name for p in mcore.parent.iterdir()) == ["hf", "hf_bf16", "mcore"]


def test_cli_refuses_to_overwrite_and_reports(tmp_path):
    hf_dir = tiny(tmp_path, "qwen2", tied=False)
    out = tmp_path / "mcore"
    out.mkdir()
    cmd = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "hf-to-mcore",
           "--hf", str(hf_dir), "--out", str(out), "--tp", "2", "--no-progress"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "exists; pass --force" in refused.stderr
    assert list(out.iterdir()) == []
    done = subprocess.run(cmd + ["--force"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["command"] == "hf-to-mcore" and Path(report["out"]) == out
    assert (out / "metadata.json").exists() and (out / "openr1_checkpoint.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mcore", "qwen2"]  # no temp dirs
