"""Preemption: SIGTERM stops the run after the current step, with a checkpoint, exit 0.

Slurm sends SIGTERM at the time limit (`#SBATCH --signal=TERM@120` sends it 120 s
before), as do Kubernetes and most schedulers before they kill. The handler only sets a
flag; the loops check it once at the end of each step, where every rank is between
steps, and then `policy.save_and_exit` writes the checkpoint and exits 0. A second SIGTERM
kills at once (the default action).

    preemption.install()                 # top of main(), before any work
    for step in ...:
        ...
        if preemption.requested():       # collective: ranks may get the signal apart
            policy_lib.save_and_exit(ctx, recipe.run, step + 1, logger)

Under torchrun the agent forwards SIGTERM to its workers but kills them 30 s later:
signal the workers (e.g. `srun --signal`), or keep steps shorter than that.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

_requested = False


def install() -> None:
    """Handle SIGTERM in this process by asking the loop to stop after its step."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def requested() -> bool:
    """Whether any rank got SIGTERM (collective when the world has several ranks: a MAX
    all-reduce of one flag, so every rank stops at the same step)."""
    flag = torch.tensor([int(_requested)], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def _on_sigterm(signum, frame) -> None:
    global _requested
    if _requested:  # the second one: die now
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _requested = True
    print("SIGTERM: finishing this step, then a checkpoint and exit 0 (again: die now)",
          file=sys.stderr, flush=True)
