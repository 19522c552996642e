"""train/perf.py: the perf/* metrics a loop logs, from the model's shapes and the step's
sequences, against utils/flops.py's count and this host's measured peak (no GPU here, so no
gpu/* keys: the telemetry's no-GPU path)."""

import pytest

from openr1_mega.models.archs import arch_config
from openr1_mega.models.tiny import write_tiny_model
from openr1_mega.train.perf import StepPerf
from openr1_mega.utils.flops import train_step_flops


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_step_perf_metrics(tmp_path, recompute):
    model_dir = write_tiny_model(tmp_path / "m", "qwen2")
    perf = StepPerf(model_dir, "fp32", recompute, "cpu", num_devices=2)
    lengths = [17, 40, 9]
    row = perf.metrics(lengths, train_seconds=0.5)
    perf.close()
    flops = train_step_flops(arch_config(model_dir), lengths, recompute)
    assert row["perf/tflops"] == pytest.approx(flops / 0.5 / 2 / 1e12)
    assert row["perf/mfu"] == pytest.approx(row["perf/tflops"] / perf.peak.tflops)
    assert row["perf/tokens_per_second"] == pytest.approx(sum(lengths) / 0.5)
    assert perf.peak.source.startswith("measured cpu fp32")
    assert not any(k.startswith("gpu/") for k in row)
