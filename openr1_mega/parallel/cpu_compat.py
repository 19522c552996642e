"""Run Megatron-Core on CPU (gloo): a small compatibility layer, active only without CUDA.

Megatron-Core 0.16.1 assumes a GPU in a handful of places that are not kernels but
plumbing. Where no CUDA device exists, `install()` makes "the device" mean the CPU:

- `torch.cuda.current_device()` returns "cpu" (Megatron passes it as `device=`), and
  `Tensor.cuda()` / `torch.cuda.synchronize()` become no-ops;
- the model-parallel RNG tracker becomes `CpuRNGStatesTracker`: each named state (TP,
  expert, data-parallel) lives in its own generator state, swapped into the CPU default
  generator only inside `fork()` and swapped back after, so the default generator's
  stream is untouched by forks (Megatron's own tracker would warn "CPU RNG state changed
  within GPU RNG context" when mapped onto the default generator);
- `moe_utils.te_general_gemm` is defined as None when Transformer Engine is absent
  (this one also on CUDA machines without TE).
The MoE `alltoall` dispatcher creates CUDA streams; `config.to_megatron` selects the
`allgather` dispatcher on CPU instead. With CUDA present, `install()` does nothing.
Megatron's pipeline schedules and aux-loss trackers also create bookkeeping tensors with a
literal `device="cuda"`; callers run those inside `parallel.cpu_device.cuda_as_cpu()`, a
scoped torch-function mode (not installed globally: it would tax every torch call of the
process, vLLM's included).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.moe import moe_utils

_INSTALLED = False


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Megatron's RNG tracker with named states kept apart from the CPU default generator."""

    def add(self, name: str, seed: int) -> None:
        """Track a new state seeded with `seed` without touching the default generator."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the body with state `name` in the default generator; restore it afterwards."""
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _get_device_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_device_rng_state(new_state, device=-1, graph_safe=False) -> None:
    torch.set_rng_state(new_state)


def _cpu_current_device() -> str:
    return "cpu"


def _tensor_stays(self, *args, **kwargs):  # Tensor.cuda(): the device is the CPU
    return self


def _no_sync(*args, **kwargs) -> None:
    return None


def install() -> bool:
    """Apply the CPU compatibility layer if CUDA is absent; returns whether it is active."""
    global _INSTALLED
    if not hasattr(moe_utils, "te_general_gemm"):  # undefined without TE, even on CUDA
        moe_utils.te_general_gemm = None
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _no_sync
    torch.Tensor.cuda = _tensor_stays
    mcore_random._get_cuda_rng_state = _get_device_rng_state
    mcore_random._set_cuda_rng_state = _set_device_rng_state
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _INSTALLED = True
    return True


def seed(seed: int, tp_rank: int, ep_rank: int, etp_rank: int) -> None:
    """CPU twin of `model_parallel_cuda_manual_seed`: same seeds, CPU tracker."""
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed + 1024 + 100 * ep_rank + etp_rank)
