"""Every way users launch the examples really runs (CPU, gloo, the tiny SFT recipe, 2 steps).

- `bash examples/sft_distill.sh` (one rank) is the reference run;
- `torchrun --nproc-per-node 2 examples/sft_distill.sh` (torchrun runs the file with Python),
  `torchrun --no-python ...`, two srun-style tasks (Slurm's variables only, mapped by
  `parallel.launch`), and the multi-node form rehearsed on localhost (two
  `torchrun --nnodes 2` agents meeting at a c10d rendezvous) each train the same 2 steps on
  TP=2 (a layout that needs both ranks): the same losses and gradient norms as the
  one-rank run;
- `torchrun --nproc-per-node 2 examples/grpo_dense.sh` runs a GRPO step at TP=2;
- the Slurm variable mapping, unit by unit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from openr1_mega.parallel.launch import first_host, slurm_env

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SFT_ARGS = ["sft.num_train=16", "run.export_hf=false"]  # 2 steps of 2 packed rows
TP2 = "parallel.tp=2"  # a layout that cannot start unless the two ranks found each other


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables, plus `extra`."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC")
    env = {k: v for k, v in os.environ.items()
           if k not in launcher and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**env, "PYTHONPATH": str(ROOT), "PY": sys.executable, "OMP_NUM_THREADS": "1",
            **extra}


def _start(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(*procs: subprocess.Popen) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{proc.args} failed:\n{out[-4000:]}"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> list[dict]:
    """The reference: `bash examples/sft_distill.sh` on one rank."""
    out = tmp_path_factory.mktemp("bash") / "run"
    _finish(_start(["bash", "examples/sft_distill.sh", *SFT_ARGS, f"run.output_dir={out}"]))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["perf/tflops"] > 0 and 0 < r["perf/mfu"] for r in rows)  # train/perf.py
    return rows


def _assert_same_steps(out: Path, one_rank: list[dict]) -> None:
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row, ref in zip(rows, one_rank, strict=True):  # TP=2 computes the same step
        for key in ("loss", "grad_norm"):
            assert row[key] == pytest.approx(ref[key], rel=1e-5), key


@pytest.mark.slow
def test_torchrun_runs_the_script_with_python(tmp_path, one_rank):
    out = tmp_path / "run"
    _finish(_start([*TORCHRUN, "--standalone", "--nproc-per-node", "2",
                    "examples/sft_distill.sh", *SFT_ARGS, TP2, f"run.output_dir={out}"]))
    _assert_same_steps(out, one_rank)


@pytest.mark.slow
def test_torchrun_no_python(tmp_path, one_rank):
    out = tmp_path / "run"
    _finish(_start([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--no-python",
                    "examples/sft_distill.sh", *SFT_ARGS, TP2, f"run.output_dir={out}"]))
    _assert_same_steps(out, one_rank)


@pytest.mark.slow
def test_multi_node_rendezvous_on_localhost(tmp_path, one_rank):
    out, port = tmp_path / "run", _free_port()
    nodes = [_start([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
                     str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                     f"127.0.0.1:{port}", "examples/sft_distill.sh", *SFT_ARGS, TP2,
                     f"run.output_dir={out}"]) for node in (0, 1)]
    _finish(*nodes)
    _assert_same_steps(out, one_rank)


@pytest.mark.slow
def test_srun_tasks_one_per_rank(tmp_path, one_rank):
    """What `srun --ntasks 2 examples/sft_distill.sh` starts: two tasks with Slurm's env."""
    out, port = tmp_path / "run", str(_free_port())
    tasks = [_start(["examples/sft_distill.sh", *SFT_ARGS, TP2, f"run.output_dir={out}"],
                    SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                    SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="1", MASTER_PORT=port)
             for rank in (0, 1)]
    _finish(*tasks)
    _assert_same_steps(out, one_rank)


@pytest.mark.slow
def test_torchrun_grpo_dense_launcher(tmp_path):
    out = tmp_path / "run"
    _finish(_start([*TORCHRUN, "--standalone", "--nproc-per-node", "2",
                    "examples/grpo_dense.sh", "grpo.steps=1", "grpo.num_iterations=1",
                    "run.save_every=0", "run.export_hf=false", f"run.output_dir={out}"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]


def test_launchers_parse_as_bash_and_python():
    for script in ("sft_distill.sh", "grpo_dense.sh", "grpo_moe.sh"):
        path = ROOT / "examples" / script
        subprocess.run(["bash", "-n", str(path)], check=True)
        compile(path.read_text(), str(path), "exec")
        assert os.access(path, os.X_OK), f"{path} must be executable for torchrun --no-python"
    subprocess.run(["bash", "-n", str(ROOT / "examples/slurm/train.sbatch")], check=True)


def test_first_host_of_slurm_hostlists():
    assert first_host("gpu07") == "gpu07"
    assert first_host("node[001-004,007],login2") == "node001"
    assert first_host("node[9,3-4]") == "node9"
    assert first_host("login2,node[001-004]") == "login2"
    assert first_host("rack[1-2]-gpu[03-04]") == "rack1-gpu03"
    with pytest.raises(ValueError, match="names no host"):
        first_host("")


def test_slurm_env_maps_srun_tasks():
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    assert slurm_env(slurm) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                "MASTER_ADDR": "gpu07", "MASTER_PORT": "29742"}
    assert slurm_env({**slurm, "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"
    assert slurm_env({**slurm, "RANK": "0"}) == {}  # torchrun inside srun: torchrun's env wins
    assert slurm_env({"PATH": "/bin"}) == {}
    with pytest.raises(RuntimeError, match="SLURM_NTASKS"):
        slurm_env({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "a"})
