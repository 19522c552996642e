"""Which launcher started this process, as torch.distributed's env:// variables.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `srun` with one
task per GPU sets only Slurm's own variables; `slurm_env` translates them:

    RANK        <- SLURM_PROCID
    WORLD_SIZE  <- SLURM_NTASKS
    LOCAL_RANK  <- SLURM_LOCALID
    MASTER_ADDR <- first host of SLURM_JOB_NODELIST ("gpu[07-09,12],cpu3" -> "gpu07")
    MASTER_PORT <- MASTER_PORT if set, else 29500 + SLURM_JOB_ID % 1000 (one job's tasks
                   agree on it; two jobs sharing a node rarely collide)

torchrun's variables win when both are present (torchrun started inside an srun task).
Run under srun, not in the batch script itself: there SLURM_NTASKS counts the whole job's
tasks while only one process runs, so the world would wait for ranks that never come.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

_BRACKET = re.compile(r"\[([^\]]*)\]")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist expression (no `scontrol` needed).

    "node[001-004,007],login2" -> "node001"; "rack[1-2]-gpu[3-4]" -> "rack1-gpu3".
    """
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first comma outside brackets ends the host
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    host = _BRACKET.sub(lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end])
    if not host:
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r} names no host")
    return host


def slurm_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun-style variables for an srun task; {} when torchrun set them or no Slurm."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    missing = [k for k in ("SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")
               if k not in environ]
    if missing:
        raise RuntimeError(f"SLURM_PROCID is set but {', '.join(missing)} is not: start one "
                           "task per GPU with srun, or launch with torchrun")
    port = environ.get("MASTER_PORT") or str(29500 + int(environ.get("SLURM_JOB_ID", 0)) % 1000)
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ["SLURM_LOCALID"],
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"]),
            "MASTER_PORT": port}


def apply_launcher_env() -> None:
    """Fill os.environ from Slurm when srun (not torchrun) started this process."""
    os.environ.update(slurm_env(os.environ))
