"""The machine a measurement ran on, named beside every figure (benchmarks, results JSON)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. "AMD EPYC"), else what platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), "")
    return name or platform.processor() or platform.machine() or "unknown CPU"
