"""The machine's matmul peak, and the `perf/tflops` / `perf/mfu` a training loop logs.

Two peaks, because a CPU has no datasheet number worth trusting and a GPU has one:
  measured   `measure_matmul_tflops`: best of a few square torch.matmul runs on this device
             (fp32 and bf16), a second or two in all. What a CPU run's MFU is relative to.
  published  `GPU_SPECS`: NVIDIA's dense (no 2:4 sparsity) tensor-core peaks, HBM
             bandwidth and memory of the SXM parts; `gpu_spec` maps a device name read
             through nvidia-ml-py ("NVIDIA H100 80GB HBM3") onto one of them.
`machine_peak` picks: the published bf16 peak on a known GPU, else the measured one.
`perf_metrics(step_flops, seconds, peak)` is the pure function the loops call per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet numbers of one accelerator (SXM form, dense math)."""

    name: str
    bf16_tflops: float
    """Dense BF16/FP16 tensor-core peak (TFLOP/s)."""
    fp8_tflops: float | None
    """Dense FP8 peak (TFLOP/s); None where the part has no FP8 tensor cores."""
    hbm_tb_s: float
    """HBM bandwidth (TB/s = 1e12 bytes/s)."""
    memory_gib: float
    """Memory a process can allocate, as nvidia-smi reports the total (GiB)."""


# NVIDIA datasheets (H100/H200 SXM, A100 SXM4 80GB, HGX B200), dense figures.
GPU_SPECS: dict[str, GpuSpec] = {
    "a100": GpuSpec("A100-SXM4-80GB", 312.0, None, 2.039, 80.0),
    "h100": GpuSpec("H100-SXM5-80GB", 989.0, 1979.0, 3.35, 79.6),
    "h200": GpuSpec("H200-SXM-141GB", 989.0, 1979.0, 4.8, 140.4),
    "b200": GpuSpec("B200-SXM-180GB", 2250.0, 4500.0, 8.0, 179.0),
}


@dataclass(frozen=True)
class Peak:
    """The FLOP/s that MFU divides by, and where it came from."""

    tflops: float
    source: str
    """'published <spec name>' or 'measured <device> <dtype> matmul n=<size>'."""


def gpu_spec(device_name: str) -> GpuSpec | None:
    """The GPU_SPECS entry whose key appears in `device_name` (case-insensitive), or None."""
    lowered = device_name.lower()
    for key, spec in GPU_SPECS.items():
        if key in lowered:
            return spec
    return None


def nvml_device_names() -> list[str]:
    """Names of the GPUs nvidia-ml-py sees; [] without the package, a driver or a GPU."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        names = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
            names.append(name.decode() if isinstance(name, bytes) else name)
        return names
    finally:
        pynvml.nvmlShutdown()


def measure_matmul_tflops(dtype: torch.dtype, device: str = "cpu", size: int = 1024,
                          repeats: int = 3) -> float:
    """Best-of-`repeats` TFLOP/s of a [size, size] @ [size, size] matmul (2*size^3 FLOPs).

    One untimed warm-up first (thread pools, cuBLAS heuristics); GPUs are synchronised
    around each timed call so the time covers the kernel, not the launch.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e12


def measured_peaks(device: str = "cpu", size: int = 1024, repeats: int = 3) -> dict[str, float]:
    """This device's own fp32 and bf16 matmul TFLOP/s (`perf/peak_fp32_tflops`, ...), each the
    best of `repeats` timed runs (more repeats: a truer peak on a shared machine)."""
    return {f"perf/peak_{name}_tflops": measure_matmul_tflops(dtype, device, size, repeats)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def machine_peak(dtype: str = "bf16", device: str | None = None) -> Peak:
    """Peak for MFU: a known GPU's published dense peak, else this device's measured one.

    Args:
        dtype: "bf16" or "fp32": the dtype the training matmuls run in. On a known GPU
            fp32 still divides by the bf16 tensor-core peak (Megatron's MFU convention).
        device: "cpu" or "cuda[:i]"; None: cuda when torch sees one, else cpu.
    """
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype={dtype!r}: expected bf16 or fp32")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        spec = next(filter(None, map(gpu_spec, nvml_device_names())), None)
        if spec is not None:
            return Peak(spec.bf16_tflops, f"published {spec.name} dense bf16")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    size = 2048 if device.startswith("cuda") else 1024
    tflops = measure_matmul_tflops(torch_dtype, device, size)
    return Peak(tflops, f"measured {device} {dtype} matmul n={size}")


def perf_metrics(step_flops: float, seconds: float, peak_tflops: float,
                 num_devices: int = 1) -> dict[str, float]:
    """`perf/tflops` (achieved per device) and `perf/mfu` (achieved / peak) of one step.

    Args:
        step_flops: model FLOPs of the step summed over all devices (utils.flops).
        seconds: wall time of the step (or of the phase being measured).
        peak_tflops: one device's peak (`machine_peak(...).tflops`).
        num_devices: devices that shared the work.
    """
    if seconds <= 0 or peak_tflops <= 0 or num_devices < 1:
        raise ValueError(f"perf_metrics: seconds={seconds}, peak_tflops={peak_tflops} and "
                         f"num_devices={num_devices} must be positive")
    achieved = step_flops / seconds / num_devices / 1e12
    return {"perf/tflops": achieved, "perf/mfu": achieved / peak_tflops}
