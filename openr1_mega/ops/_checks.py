"""Input checks shared by the ops: every failure is a ValueError naming the argument.

Value checks on targets (range) read the tensor, which is a host sync on a GPU; they are
skipped while torch.compile traces and on meta tensors, where the kernels' own guards remain.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOGITS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_temperature(temperature: float) -> float:
    """A finite temperature > 0, as a Python float."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature: expected a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature}")
    return float(temperature)


def check_logits(logits: Tensor, name: str = "logits") -> None:
    """Floating logits [..., V] with V >= 1."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise ValueError(f"{name}: dtype must be float32, float64, bfloat16 or float16, "
                         f"got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name}: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")


def check_targets(targets: Tensor, lead_shape: torch.Size, device: torch.device) -> Tensor:
    """Integer targets with the logits' leading shape, on their device; returned as int64."""
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets: expected a tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets: dtype must be an integer type (int64), got {targets.dtype}")
    if targets.shape != lead_shape:
        raise ValueError(f"targets: expected shape {tuple(lead_shape)} (logits without the "
                         f"vocab dimension), got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets: must be on {device} like the logits, got {targets.device}")
    return targets.long()


def values_readable(t: Tensor) -> bool:
    """Whether value checks may read `t`: not while torch.compile traces, not on meta."""
    return t.numel() > 0 and t.device.type != "meta" and not torch.compiler.is_compiling()


def check_target_range(targets: Tensor, low: int, high: int) -> None:
    """Every target in [low, high) (skipped where `values_readable` is False)."""
    if not values_readable(targets):
        return
    bad = (targets < low) | (targets >= high)
    if bool(bad.any()):  # host sync on a GPU
        first = int(bad.nonzero()[0, 0]) if targets.dim() == 1 else None
        where = f" (first at position {first})" if first is not None else ""
        raise ValueError(f"targets: values must lie in [{low}, {high}), got "
                         f"{int(targets[bad].flatten()[0])}{where}")
