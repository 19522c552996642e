"""One SFT and one GRPO step of a small Qwen2 on the GPU (tools/gpu_step_check.py).

The script checks what it runs against transformers on the same device: the first SFT
loss equals transformers' token-mean NLL of the same rows; the trainer's GRPO log-probs
of pre-made completions equal transformers' (the stand-in sampler) within 1e-4; grad
norms are finite and positive. A fresh process: Megatron's parallel state is global.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_sft_and_grpo_steps_on_cuda(tmp_path):
    out = tmp_path / "steps.json"
    done = subprocess.run(
        [sys.executable, "tools/gpu_step_check.py", "--device", "cuda", "--size", "tiny",
         "--steps", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
        timeout=600, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cuda" and report["ok"]
    for algo in ("sft", "grpo"):
        assert all(report[algo]["checks"].values()), report[algo]
        assert report[algo]["peak_memory_bytes"] > 0
