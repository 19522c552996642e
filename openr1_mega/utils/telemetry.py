"""GPU telemetry for the training logs: utilisation, memory and power, sampled in the background.

    telemetry = GpuTelemetry(interval_s=1.0)   # no-op (summary() == {}) without GPUs
    telemetry.start()
    ... each step: logger.log(step, {**metrics, **telemetry.summary()})
    telemetry.stop()

A daemon thread calls `read()` every `interval_s` seconds; `read` returns one
`GpuReading` per GPU. By default it reads NVML through nvidia-ml-py (all GPUs the driver
sees on this node); tests pass their own function. `summary()` reduces the readings taken
since its previous call into `gpu/*` metrics and starts a new window; an empty window
(a step shorter than the interval) takes one reading on the spot, so every step has numbers.

Metrics, per GPU i and over all GPUs:
  gpu/<i>/util_pct        mean utilisation (% of time a kernel ran, NVML's definition)
  gpu/<i>/mem_used_gib    mean memory used          gpu/<i>/mem_peak_gib  highest seen
  gpu/<i>/power_w         mean board power
  gpu/util_pct            mean over GPUs            gpu/mem_peak_gib      highest over GPUs
  gpu/power_w             sum over GPUs of the means (the node's draw)
  gpu/samples             readings in the window
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

GIB = 2**30


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one instant."""

    util_pct: float
    mem_used_bytes: float
    power_w: float


Reader = Callable[[], list[GpuReading]]


def nvml_reader() -> Reader | None:
    """A reader over NVML, or None when nvidia-ml-py, the driver or a GPU is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                   for i in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError:
        return None
    if not handles:
        return None

    def read() -> list[GpuReading]:
        return [GpuReading(util_pct=float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                           mem_used_bytes=float(pynvml.nvmlDeviceGetMemoryInfo(h).used),
                           power_w=pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0)
                for h in handles]

    return read


class GpuTelemetry:
    """Background sampler of per-GPU readings; `summary()` gives `gpu/*` step metrics."""

    def __init__(self, interval_s: float = 1.0, read: Reader | None = None):
        """Args:
            interval_s: seconds between readings of the background thread.
            read: returns one GpuReading per GPU; None: NVML (no-op when it finds no GPU).
        """
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s}: must be > 0")
        self.interval_s = interval_s
        self.read = read if read is not None else nvml_reader()
        self._window: list[list[GpuReading]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """Whether there is anything to sample."""
        return self.read is not None

    def sample(self) -> None:
        """Take one reading of every GPU into the current window."""
        if not self.enabled:
            return
        readings = self.read()
        with self._lock:
            self._window.append(readings)

    def start(self) -> Self:
        """Start the background thread (once; a no-op without GPUs)."""
        if self.enabled and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="gpu-telemetry", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and join the background thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def summary(self) -> dict[str, float]:
        """`gpu/*` metrics over the readings since the last call ({} without GPUs)."""
        if not self.enabled:
            return {}
        with self._lock:
            window, self._window = self._window, []
        if not window:
            window = [self.read()]
        return summarize(window)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def summarize(window: list[list[GpuReading]]) -> dict[str, float]:
    """Reduce readings (window[t][gpu]) to per-GPU means/peaks and node-wide figures."""
    num_gpus = len(window[0])
    if num_gpus == 0:
        return {}
    if any(len(readings) != num_gpus for readings in window):
        raise ValueError("telemetry readings name a varying number of GPUs: "
                         f"{[len(r) for r in window]}")
    out: dict[str, float] = {}
    for gpu in range(num_gpus):
        series = [readings[gpu] for readings in window]
        out[f"gpu/{gpu}/util_pct"] = _mean(r.util_pct for r in series)
        out[f"gpu/{gpu}/mem_used_gib"] = _mean(r.mem_used_bytes for r in series) / GIB
        out[f"gpu/{gpu}/mem_peak_gib"] = max(r.mem_used_bytes for r in series) / GIB
        out[f"gpu/{gpu}/power_w"] = _mean(r.power_w for r in series)
    out["gpu/util_pct"] = _mean(out[f"gpu/{g}/util_pct"] for g in range(num_gpus))
    out["gpu/mem_peak_gib"] = max(out[f"gpu/{g}/mem_peak_gib"] for g in range(num_gpus))
    out["gpu/power_w"] = sum(out[f"gpu/{g}/power_w"] for g in range(num_gpus))
    out["gpu/samples"] = float(len(window))
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
