"""The output directory of a training run, decided at start-up before any work.

A directory that holds an earlier run (checkpoints, metrics, an HF export) is
- continued with `--resume` (and with no checkpoint in it the run starts fresh, saying so:
  the first attempt of an auto-requeued Slurm job launches with `--resume` too);
- cleared and started afresh when the recipe says `run.overwrite: true`;
- refused otherwise, at once, naming the directory and both options: an earlier version
  trained to the end and only then died at the final save ("step_000001 exists").
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from openr1_mega.config.train import RunConfig
from openr1_mega.utils.io import atomic_file

EARLIER_RUN = ("checkpoints", "metrics.jsonl", "hf")
"""Entries whose presence means the directory holds an earlier run."""
CLEARED = EARLIER_RUN + ("tb", "metrics.png")
"""Entries `run.overwrite` deletes (never the directory itself, never anything else)."""


def prepare_output_dir(run: RunConfig, resume: bool) -> None:
    """Resume, start fresh (`run.overwrite`), or refuse; see the module docstring.

    Called before the process group exists: every rank decides alike from the directory,
    and only global rank 0 (the launcher's RANK) deletes.
    """
    out = Path(run.output_dir)
    if resume and run.overwrite:
        raise ValueError(f"--resume and run.overwrite=true contradict each other for {out}: "
                         "pick one")
    found = [name for name in EARLIER_RUN if (out / name).exists()]
    if resume or not found:
        return
    if not run.overwrite:
        raise FileExistsError(
            f"run.output_dir={out} holds an earlier run ({', '.join(found)}): pass --resume "
            "to continue it, or set run.overwrite=true to delete it and start fresh")
    if int(os.environ.get("RANK", "0")) == 0:
        for name in CLEARED:
            _remove(out / name)
        print(f"run.overwrite: cleared the earlier run in {out}", flush=True)


def truncate_metrics(out_dir: str | Path, step: int) -> None:
    """Drop metrics.jsonl rows the resumed run will log again: rows past `step`, or every
    row when it starts from scratch (step 0), so no step appears twice."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [] if step == 0 else [line for line in lines
                                 if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        with atomic_file(path) as f:
            f.write("".join(line + "\n" for line in kept))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
