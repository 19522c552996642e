"""The embedded demo's wiring (base -> SFT -> GRPO -> result + plot), on a short budget.

The full demo (`make demo`) is measured in the README; here both stages are cut short so
the test checks that every stage hands the next what it needs, not the accuracy gain.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "openr1_mega.demo", "--out", str(tmp_path),
           "--sft", "sft.num_train=300", "--sft", "sft.epochs=1.0",
           "grpo.steps=2", "grpo.prompts_per_step=4", "grpo.eval_every=0", "data.num_eval=16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert 0.0 <= result["sft_accuracy"] <= 1.0 and 0.0 <= result["grpo_accuracy"] <= 1.0
    assert "held-out pass@1" in proc.stdout and "held-out greedy accuracy" in proc.stdout
    assert (tmp_path / "grpo" / "metrics.png").stat().st_size > 0
    assert (tmp_path / "sft" / "hf" / "model.safetensors").exists()
