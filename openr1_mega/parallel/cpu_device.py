"""`cuda_as_cpu()`: run Megatron-Core code that names the "cuda" device on a CPU-only machine.

Megatron-Core 0.16.1 creates small bookkeeping tensors with `device="cuda"` in its
pipeline schedules, optimizers and gradient clipping (token counters, norms, overflow
flags). Without CUDA those calls fail, although nothing in them needs a GPU. Inside this
context a TorchFunctionMode rewrites a "cuda" device argument to "cpu" for every torch
call, so Megatron's own schedules and optimizers run unchanged on gloo. With CUDA present
it does nothing. Compute kernels are untouched: only device placement is rewritten.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaAsCpuMode(TorchFunctionMode):
    """Rewrites `device="cuda"` (keyword, or the device argument of Tensor.to) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def cuda_as_cpu():
    """A context in which "cuda" means the CPU; a no-op when CUDA is available."""
    return contextlib.nullcontext() if torch.cuda.is_available() else CudaAsCpuMode()
