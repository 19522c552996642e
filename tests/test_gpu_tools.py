"""The GPU check's parts that run anywhere: tools/gpu_step_check.py on CPU, and
tools/gpu_smoke.sh parses as bash (it only runs where a GPU is; see tests/gpu/).

On CPU the step check runs the same SFT and GRPO steps of the tiny Qwen2 (fp32) and its
own checks against transformers: the first SFT loss equals transformers' NLL of the same
rows, the trainer's log-probs of the pre-made completions equal transformers' within 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_smoke_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "tools/gpu_smoke.sh")], check=True)


@pytest.mark.slow
def test_step_check_runs_on_cpu(tmp_path):
    out = tmp_path / "steps.json"
    done = subprocess.run(
        [sys.executable, "tools/gpu_step_check.py", "--device", "cpu", "--size", "tiny",
         "--steps", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
        timeout=900, check=False, env={**os.environ, "PYTHONPATH": str(ROOT),
                                       "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    sft, grpo = report["sft"], report["grpo"]
    assert report["ok"] and all(sft["checks"].values()) and all(grpo["checks"].values())
    assert abs(sft["first_step"]["loss"] - sft["transformers_loss"]) < 1e-4
    assert grpo["first_step"]["sampler/abs_logprob_diff"] < 1e-4
    assert len(sft["step_seconds"]) == len(grpo["step_seconds"]) == 2
