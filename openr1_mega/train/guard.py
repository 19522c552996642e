"""Non-finite steps: find them before the optimizer runs, skip them, stop after too many.

A NaN or inf in the loss or in any gradient would reach the weights through the optimizer
step and poison every later step. `step_is_finite` looks at the step's reduced losses (the
last pipeline stage holds them) and at every local gradient, then takes the maximum of the
"bad" flag over the whole job (one scalar all-reduce), so every rank makes the same choice;
train/step.py skips the optimizer step when it is False (for the CPU AdamW and Megatron's
GPU optimizer alike: the step is never called). `BadStepGuard` is the loop's side: it counts
skipped steps, logs each with the step and the ids of its completions (or rows), and stops
the run when more than `run.max_bad_steps` come in a row. The weights then are those of
the last good step and no checkpoint is written or removed, so the newest checkpoint on
disk is the last good one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SHOWN_IDS = 8
"""How many completion ids a skipped-step warning lists (then a count of the rest)."""


class BadStepsError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def step_is_finite(params: Iterable[torch.nn.Parameter],
                   losses: Sequence[dict[str, Any]] = ()) -> bool:
    """True when every local gradient (`main_grad`, else `grad`) and every reduced "loss"
    is finite on every rank (collective over the default group when it is initialised)."""
    bad = torch.zeros((), dtype=torch.bool)
    for p in params:
        grad = getattr(p, "main_grad", None)
        grad = p.grad if grad is None else grad
        if grad is not None:
            bad = bad.to(grad.device) | ~torch.isfinite(grad).all()
    for values in losses:
        loss = values.get("loss") if isinstance(values, dict) else None
        if loss is not None:
            bad = bad.to(torch.as_tensor(loss).device) | ~torch.isfinite(
                torch.as_tensor(loss)).all()
    if dist.is_initialized():
        flag = bad.to(_collective_device()).to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = flag.bool()
    return not bool(bad)  # host sync: every rank needs the answer before stepping


def step_if_finite(optimizer: Any, params: Iterable[torch.nn.Parameter],
                   losses: Sequence[dict[str, Any]] = ()) -> tuple[float, bool]:
    """Run `optimizer.step()` unless the step is not finite; returns (grad norm, skipped).

    Collective (see `step_is_finite`). Under fp16's dynamic loss scaler the gradients are
    the scaler's to check: an overflow there is routine (it lowers the scale and skips the
    step itself) and is not counted as skipped; only the loss is checked here.
    """
    scaled = _has_grad_scaler(optimizer)
    if not step_is_finite(() if scaled else params, losses):
        return float("nan"), True
    updated, grad_norm, _ = optimizer.step()
    norm = float("nan") if grad_norm is None else float(grad_norm)
    return norm, not updated and not scaled


def _has_grad_scaler(optimizer: Any) -> bool:
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(getattr(o, "grad_scaler", None) is not None for o in parts)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def completion_ids(prompts: Sequence[dict], completions: Sequence[Any]) -> list[str]:
    """`<prompt id>/<sample>` of each completion (the prompt's position when it has no id)."""
    seen: dict[int, int] = {}
    out = []
    for c in completions:
        k = seen.get(c.prompt_index, 0)
        seen[c.prompt_index] = k + 1
        out.append(f"{prompts[c.prompt_index].get('id', c.prompt_index)}/{k}")
    return out


class BadStepGuard:
    """Counts optimizer steps skipped for non-finite values; stops a run past the limit.

    Args:
        max_bad_steps: skipped steps allowed in a row (`run.max_bad_steps`).
        output_dir: where the run's checkpoints are (named in the stop message).
    """

    def __init__(self, max_bad_steps: int, output_dir: str) -> None:
        self.max_bad_steps = max_bad_steps
        self.output_dir = output_dir
        self.in_a_row = 0
        self.total = 0

    def check(self, step: int, metrics: dict[str, float], ids: Sequence[str] = ()) -> None:
        """Record one optimizer step's outcome (train_step's metrics); adds `bad_steps`.

        Raises:
            BadStepsError: more than `max_bad_steps` skipped steps in a row.
        """
        if not metrics.get("update_skipped"):
            self.in_a_row = 0
            metrics["bad_steps"] = float(self.total)
            return
        self.in_a_row += 1
        self.total += 1
        metrics["bad_steps"] = float(self.total)
        shown = ", ".join(ids[:SHOWN_IDS]) + (f", ... {len(ids) - SHOWN_IDS} more"
                                              if len(ids) > SHOWN_IDS else "")
        logger.warning("step %d: non-finite loss or gradient (grad_norm=%s): update skipped "
                       "(%d in a row, %d in all); completions: [%s]", step,
                       metrics.get("grad_norm"), self.in_a_row, self.total, shown)
        if self.in_a_row > self.max_bad_steps:
            raise BadStepsError(
                f"stopping at step {step}: {self.in_a_row} optimizer steps in a row had a "
                f"non-finite loss or gradient, more than run.max_bad_steps="
                f"{self.max_bad_steps}. None of them changed the weights and no checkpoint "
                f"was written, so the newest checkpoint under {self.output_dir} is the last "
                f"good one (resume from it with --resume, e.g. with a lower optim.lr). "
                f"Last completions: [{shown}]")
