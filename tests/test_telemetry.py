"""GPU telemetry: the no-GPU path is a no-op; the aggregation is checked on scripted readings."""

from __future__ import annotations

import threading

import pytest
import torch

from openr1_mega.utils.telemetry import GIB, GpuReading, GpuTelemetry, nvml_reader


def _scripted(rows):
    """A reader returning rows[0], rows[1], ... then repeating the last row."""
    calls = iter(rows)
    last = [rows[-1]]

    def read():
        last[0] = next(calls, last[0])
        return last[0]
    return read


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without GPUs")
def test_without_gpus_it_is_a_no_op():
    assert nvml_reader() is None
    telemetry = GpuTelemetry(interval_s=0.01)
    assert not telemetry.enabled
    with telemetry:
        assert telemetry.summary() == {}
    assert telemetry.summary() == {}


def test_summary_means_and_peaks_per_gpu_and_node():
    rows = [
        [GpuReading(50.0, 10 * GIB, 300.0), GpuReading(100.0, 20 * GIB, 500.0)],
        [GpuReading(70.0, 30 * GIB, 400.0), GpuReading(80.0, 10 * GIB, 600.0)],
        [GpuReading(0.0, 5 * GIB, 100.0), GpuReading(0.0, 5 * GIB, 100.0)],
    ]
    telemetry = GpuTelemetry(read=_scripted(rows))
    telemetry.sample()
    telemetry.sample()
    first = telemetry.summary()
    assert first == {
        "gpu/0/util_pct": 60.0, "gpu/0/mem_used_gib": 20.0, "gpu/0/mem_peak_gib": 30.0,
        "gpu/0/power_w": 350.0,
        "gpu/1/util_pct": 90.0, "gpu/1/mem_used_gib": 15.0, "gpu/1/mem_peak_gib": 20.0,
        "gpu/1/power_w": 550.0,
        "gpu/util_pct": 75.0, "gpu/mem_peak_gib": 30.0, "gpu/power_w": 900.0,
        "gpu/samples": 2.0,
    }
    # A new window: the earlier peaks are gone; an empty window reads once on the spot.
    second = telemetry.summary()
    assert second["gpu/samples"] == 1.0 and second["gpu/mem_peak_gib"] == 5.0
    assert second["gpu/power_w"] == 200.0


def test_background_thread_samples_until_stopped():
    reads = []
    enough = threading.Event()

    def read():
        reads.append(1)
        if len(reads) >= 3:
            enough.set()
        return [GpuReading(10.0, GIB, 50.0)]

    telemetry = GpuTelemetry(interval_s=0.001, read=read)
    with telemetry:
        assert enough.wait(timeout=60)
    taken = len(reads)
    summary = telemetry.summary()
    assert summary["gpu/samples"] == taken and summary["gpu/0/mem_peak_gib"] == 1.0
    assert len(reads) == taken   # stopped: nothing read since, and the window was not empty


def test_bad_readings_are_named():
    telemetry = GpuTelemetry(read=_scripted([[GpuReading(1, 1, 1)],
                                             [GpuReading(1, 1, 1)] * 2]))
    telemetry.sample()
    telemetry.sample()
    with pytest.raises(ValueError, match="varying number of GPUs"):
        telemetry.summary()
    with pytest.raises(ValueError, match="interval_s"):
        GpuTelemetry(interval_s=0)
