"""tools/check_conversion.py: one JSON line, exit status from the tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._mcore_helpers import TOL, tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_check_conversion_via_mcore_at_tp2(tmp_path):
    hf_dir = tiny(tmp_path, "qwen2_moe", tied=True)
    strict = 1e-12  # far below fp32 reassociation noise: the exit status must say "above"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_conversion.py"), "--hf", str(hf_dir),
         "--tp", "2", "--via-mcore", "--tol", str(strict)],
        capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["max_abs_diff"] < TOL and 0 <= result["mean_abs_diff"] <= result["max_abs_diff"]
    assert result["layout"] == {"tp": 2, "pp": 1, "ep": 1, "etp": 2, "world_size": 2}
    assert result["via_mcore"] and result["dtype"] == "fp32"
    assert result["ok"] == (result["max_abs_diff"] <= strict)
    assert done.returncode == (0 if result["ok"] else 1), done.stderr[-2000:]
