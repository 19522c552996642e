"""Loads the compiled kernels (`openr1_mega._C`) once and says, per op and device, whether
they serve; where they do not, the ops fall back to the pure-torch references in
`reference.py` after one warning.

Set OPENR1_MEGA_DISABLE_EXTENSION=1 to force the references (tests use it to check the
fallback).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

DISABLE_ENV = "OPENR1_MEGA_DISABLE_EXTENSION"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@functools.cache
def extension_loaded() -> bool:
    """Import `openr1_mega._C` (registering the `openr1_mega::*` ops); warn once if it fails."""
    if os.environ.get(DISABLE_ENV, "0") == "1":
        reason = f"{DISABLE_ENV}=1"
    else:
        try:
            importlib.import_module("openr1_mega._C")
            return True
        except ImportError as err:
            reason = f"import failed: {err}"
    warnings.warn(
        f"openr1_mega._C is not available ({reason}); openr1_mega.ops uses the pure-torch "
        "references, which are slower and materialise fp32 [N, V] log-probs. Build the kernels "
        "with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


@functools.cache
def _has_kernel(op: str, device_type: str) -> bool:
    key = _DISPATCH_KEYS.get(device_type)
    found = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"openr1_mega::{op}", key
    )
    if not found:
        warnings.warn(
            f"openr1_mega::{op} has no compiled kernel for device '{device_type}'; using the "
            "pure-torch reference there.",
            RuntimeWarning,
            stacklevel=3,
        )
    return found


def use_kernel(op: str, device: torch.device) -> bool:
    """True when the compiled `openr1_mega::<op>` has a kernel for `device`'s type."""
    return extension_loaded() and _has_kernel(op, device.type)
