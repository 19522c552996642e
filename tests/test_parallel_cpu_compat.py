"""The CPU RNG tracker and process-group set-up (Megatron parallel_state on gloo)."""

from __future__ import annotations

import logging

import pytest
import torch

from openr1_mega.parallel.cpu_compat import CpuRNGStatesTracker
from tests._dist import run_world


def test_fork_leaves_the_default_generator_untouched(caplog):
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    with caplog.at_level(logging.WARNING), tracker.fork("model-parallel-rng"):
        forked = torch.rand(3)
    assert torch.equal(torch.rand(4), expected)  # as if the fork never drew
    assert "RNG state changed" not in caplog.text
    assert torch.equal(forked, torch.rand(3, generator=torch.Generator().manual_seed(123)))


def test_fork_streams_continue_and_stay_separate():
    tracker = CpuRNGStatesTracker()
    tracker.add("a", 1)
    tracker.add("b", 2)
    with tracker.fork("a"):
        first = torch.rand(2)
    with tracker.fork("b"), tracker.fork("a"):  # nested: "a" continues where it stopped
        second = torch.rand(2)
    stream = torch.rand(4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat([first, second]), stream)
    with pytest.raises(ValueError, match="seed 1 already exists"):
        tracker.add("c", 1)
    with pytest.raises(KeyError, match="not added"), tracker.fork("missing"):
        pass


def _groups_and_seeds(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from openr1_mega.config import ParallelConfig
    from openr1_mega.parallel.init import initialize

    out = {}
    for name, layout in (("tp2", ParallelConfig(tp=2)), ("dp2", ParallelConfig())):
        initialize(layout, seed=7)
        with get_cuda_rng_tracker().fork():
            tp_draw = torch.rand(2).tolist()
        with get_cuda_rng_tracker().fork("data-parallel-rng"):
            dp_draw = torch.rand(2).tolist()
        out[name] = {"tp": ps.get_tensor_model_parallel_world_size(),
                     "dp": ps.get_data_parallel_world_size(), "tp_draw": tp_draw,
                     "dp_draw": dp_draw}
    try:
        initialize(ParallelConfig(tp=3))
    except ValueError as err:
        out["error"] = str(err)
    return out


@pytest.mark.slow
def test_initialize_groups_and_model_parallel_seeds():
    r0, r1 = run_world(_groups_and_seeds, world_size=2)
    assert (r0["tp2"]["tp"], r0["tp2"]["dp"], r0["dp2"]["tp"], r0["dp2"]["dp"]) == (2, 1, 1, 2)
    # TP ranks draw different dropout masks; every rank shares the data-parallel stream
    assert r0["tp2"]["tp_draw"] != r1["tp2"]["tp_draw"]
    assert r0["tp2"]["dp_draw"] == r1["tp2"]["dp_draw"]
    # DP replicas (same TP rank) draw the same model-parallel stream
    assert r0["dp2"]["tp_draw"] == r1["dp2"]["tp_draw"]
    assert "not divisible by parallel.tp*pp*cp=3*1*1=3" in r0["error"]
