"""SIGTERM (Slurm's time limit) on a real SFT run: the run finishes its step, writes a
checkpoint of it (intact against its manifest, named by `latest`) and exits 0; running the
recipe into that directory again without --resume is refused at once, and --resume
continues from the checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from openr1_mega.models.tiny import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _recipe(tmp_path, out):
    recipe = yaml.safe_load((ROOT / "examples/recipes/tiny/sft.yaml").read_text())
    recipe["model"]["path"] = str(write_tiny_model(tmp_path / "model", "qwen2"))
    recipe["sft"].update(num_train=400, eval_fraction=0.0)
    recipe["run"] = {"output_dir": str(out), "save_every": 0, "export_hf": False}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return [sys.executable, "-m", "openr1_mega.train.sft", "--recipe", str(path)]


def _steps(out):
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x)["step"] for x in lines if x.strip()]


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_exits_0(tmp_path):
    from openr1_mega.checkpoint.dist import latest_step, step_dir, verify

    out = tmp_path / "run"
    cmd = _recipe(tmp_path, out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    while not _steps(out) and job.poll() is None:  # wait for the first finished step
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, output[-3000:]
    steps = _steps(out)
    root = out / "checkpoints"
    assert latest_step(root) == steps[-1] and verify(step_dir(root, steps[-1])) == []
    assert "preempted: checkpoint of step" in output
    assert len(list(root.glob("step_*"))) == 1  # save_every 0: the preemption checkpoint

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and f"run.output_dir={out} holds an earlier run" in again.stderr
    assert _steps(out) == steps  # refused before any work

    job = subprocess.Popen(cmd + ["--resume"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, output[-3000:]
    assert f"continuing from {step_dir(root, steps[-1])} (step {steps[-1]})" in output
    resumed = _steps(out)
    assert resumed == list(range(1, resumed[-1] + 1))  # each step once, none lost
