"""What a training loop logs about its own speed: FLOP/s against the machine's peak, GPU state.

Every step gets `perf/tflops` (achieved model FLOP/s per device over the train phase:
forward + backward + recompute, utils/flops.py, from the sequences actually trained) and
`perf/mfu` (that over the peak: a known GPU's published dense bf16 peak, else this device's
own matmul peak measured once at start-up, utils/peak.py), `perf/tokens_per_second`, and,
where nvidia-ml-py finds GPUs, `gpu/*` (utilisation, memory used/peak, power) sampled by a
background thread over the step (utils/telemetry.py). On CPU the peak is the measured
matmul rate in the training dtype, so `perf/mfu` says how close a step gets to this host.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from openr1_mega.models.archs import arch_config
from openr1_mega.utils.flops import train_step_flops
from openr1_mega.utils.peak import machine_peak, perf_metrics
from openr1_mega.utils.telemetry import GpuTelemetry


class StepPerf:
    """perf/* and gpu/* metrics of each step of one run."""

    def __init__(self, model_dir: str | Path, dtype: str, recompute: str, device: str,
                 num_devices: int):
        """Args:
            model_dir: the HF directory of the policy (its config.json gives the shapes).
            dtype: precision.dtype of the recipe ("bf16", "fp16" counts as bf16, "fp32").
            recompute: model.recompute ("none", "selective", "full").
            device: "cpu" or "cuda".
            num_devices: ranks sharing each step's work (the world size).
        """
        self.arch = arch_config(Path(model_dir))
        self.recompute = recompute
        self.num_devices = num_devices
        self.peak = machine_peak("fp32" if dtype == "fp32" else "bf16", device)
        self.telemetry = GpuTelemetry().start()

    @classmethod
    def for_run(cls, ctx, recipe) -> StepPerf:
        """The loop's StepPerf: the policy's shapes, the recipe's dtype and recompute, the
        model's device, every rank of the world."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        return cls(ctx.model_dir, recipe.precision.dtype, recipe.model.recompute,
                   ctx.device.type, world)

    def metrics(self, sequence_lengths: Sequence[int], train_seconds: float) -> dict[str, float]:
        """The step's perf/* (train phase over `sequence_lengths`, every rank's share) and
        gpu/* metrics."""
        flops = train_step_flops(self.arch, list(sequence_lengths), self.recompute)
        row = perf_metrics(flops, max(train_seconds, 1e-9), self.peak.tflops, self.num_devices)
        row["perf/tokens_per_second"] = sum(sequence_lengths) / max(train_seconds, 1e-9)
        return {**row, **self.telemetry.summary()}

    def close(self) -> None:
        self.telemetry.stop()
