"""Loads the compiled kernels (`openr1_mega._C`) once, at import, and says per op and device
whether they serve; where they do not, the ops fall back to the pure-torch references in
`reference.py` after one warning.

The answers are plain module-level values, so torch.compile traces `use_kernel` as constants.
Set OPENR1_MEGA_DISABLE_EXTENSION=1 to force the references (tests use it to check the
fallback).
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

DISABLE_ENV = "OPENR1_MEGA_DISABLE_EXTENSION"
OPS = ("token_logprob_fwd", "token_logprob_partials", "token_logprob_bwd", "token_logprob_bwd_",
       "grpo_advantage")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _load() -> bool:
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
        stacklevel=3,
    )
    return False


_LOADED = _load()
_KERNELS = {
    (op, device_type): _LOADED
    and torch._C._dispatch_has_kernel_for_dispatch_key(f"openr1_mega::{op}", key)
    for op in OPS
    for device_type, key in _DISPATCH_KEYS.items()
} | {(op, "meta"): _LOADED for op in OPS}  # the fake kernels registered in openr1_mega.ops
_warned_devices: set[str] = set()


def extension_loaded() -> bool:
    """True when the compiled extension was imported (its ops are registered)."""
    return _LOADED


def use_kernel(op: str, device: torch.device) -> bool:
    """True when the compiled `openr1_mega::<op>` has a kernel for `device`'s type."""
    found = _KERNELS.get((op, device.type), False)
    if not found and _LOADED and device.type not in _warned_devices:
        _warned_devices.add(device.type)
        warnings.warn(f"openr1_mega::{op} has no compiled kernel for device '{device.type}'; "
                      "the pure-torch reference serves there.", RuntimeWarning, stacklevel=3)
    return found
