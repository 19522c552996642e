"""A non-finite loss or gradient skips the update on every rank; too many in a row stop the
run (issue 13, §2; train/guard.py, train/step.py)."""

from __future__ import annotations

import json
import logging

import pytest

from openr1_mega.config.load import from_dict


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from openr1_mega.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen3")


def _nan_then_finite_step(rank, world, hf_dir):
    import math

    import torch
    from megatron.core import parallel_state as ps

    from openr1_mega.checkpoint.hf import load_hf_weights
    from openr1_mega.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
    from openr1_mega.config.train import GrpoConfig, OptimConfig, RolloutConfig
    from openr1_mega.models.build import build_model
    from openr1_mega.parallel.init import initialize
    from openr1_mega.rl.experience import micro_batches
    from openr1_mega.train.grpo import GrpoLoss
    from openr1_mega.train.step import build_optimizer, train_step, wrap_ddp
    from tests.test_grpo import _completions

    initialize(ParallelConfig(), seed=0)
    model = build_model(hf_dir, ParallelConfig(), precision=PrecisionConfig(dtype="fp32"),
                        model=ModelConfig(attention_backend="sdpa"))
    load_hf_weights(model, hf_dir)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-3))
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    completions = _completions(vocab)

    def step(advantages):
        batches = micro_batches(completions, advantages, token_budget=40, pad_id=0,
                                rank=ps.get_data_parallel_rank(),
                                world=ps.get_data_parallel_world_size())
        loss = GrpoLoss.for_step(GrpoConfig(loss_type="grpo"), RolloutConfig(max_tokens=16),
                                 vocab, len(completions), batches)
        return train_step(ddp, optimizer, [(b, None, None) for b in batches], loss.forward_step,
                          lr=1e-3, metric_names=loss.metric_names,
                          shape=tuple(batches[0].input_ids.shape))

    before = [p.detach().clone() for p in model.parameters()]
    poisoned = torch.tensor([1.0, -0.5, 0.3, 0.7, 0.2, -0.7])
    if rank == world - 1:  # only the last rank's completions are bad
        poisoned[world - 1::world] = float("nan")
    bad = step(poisoned)
    unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    adam_steps = len(optimizer.inner.state)
    good = step(torch.tensor([1.0, -0.5, 0.3, 0.7, 0.2, -0.7]))
    changed = not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return {"bad_skipped": bad["update_skipped"], "bad_norm_nan": math.isnan(bad["grad_norm"]),
            "unchanged": unchanged, "adam_state_after_bad": adam_steps,
            "good_skipped": good["update_skipped"], "changed": changed,
            "good_norm": good["grad_norm"]}


@pytest.mark.parametrize("world", [1, 2])
def test_non_finite_step_is_skipped_on_every_rank(tiny_dir, world):
    from tests._dist import run_world

    for result in run_world(_nan_then_finite_step, tiny_dir, world_size=world):
        assert result["bad_skipped"] == 1.0 and result["bad_norm_nan"]
        assert result["unchanged"] and result["adam_state_after_bad"] == 0
        assert result["good_skipped"] == 0.0 and result["changed"]
        assert result["good_norm"] > 0


def test_bad_step_guard_counts_logs_and_stops(caplog):
    from openr1_mega.train.guard import BadStepGuard, BadStepsError

    guard = BadStepGuard(max_bad_steps=2, output_dir="runs/x")
    ids = [f"gsm8k-{i}/0" for i in range(10)]
    bad = {"update_skipped": 1.0, "grad_norm": float("nan")}
    with caplog.at_level(logging.WARNING, logger="openr1_mega.train.guard"):
        for step, metrics in enumerate([dict(bad), dict(bad), {"update_skipped": 0.0},
                                        dict(bad), dict(bad)]):
            guard.check(step, metrics, ids)
        assert metrics["bad_steps"] == 4.0
        assert "step 4: non-finite loss or gradient" in caplog.records[-1].getMessage()
        assert "gsm8k-0/0" in caplog.records[-1].getMessage()
        with pytest.raises(BadStepsError) as err:
            guard.check(5, dict(bad), ids)
    message = str(err.value)
    assert "stopping at step 5: 3 optimizer steps in a row" in message
    assert "run.max_bad_steps=2" in message and "runs/x" in message and "gsm8k-7/0" in message


def _adamw_on_inf_grads(rank, world):
    import torch

    from openr1_mega.config.schema import ParallelConfig
    from openr1_mega.config.train import OptimConfig
    from openr1_mega.parallel.init import initialize
    from openr1_mega.train.step import CpuAdamW

    initialize(ParallelConfig(), seed=0)
    layer = torch.nn.Linear(3, 2)
    for p in layer.parameters():
        p.main_grad = torch.full_like(p, float("inf"))
    before = [p.detach().clone() for p in layer.parameters()]
    updated, norm, _ = CpuAdamW(layer, OptimConfig()).step()
    return updated, norm, all(torch.equal(a, p) for a, p in zip(before, layer.parameters()))


def test_cpu_adamw_refuses_a_non_finite_norm():
    from tests._dist import run_world

    updated, norm, unchanged = run_world(_adamw_on_inf_grads, world_size=1)[0]
    assert not updated and norm == float("inf") and unchanged


def test_max_bad_steps_is_a_recipe_field():
    from openr1_mega.config.train import RunConfig

    assert from_dict(RunConfig, {"max_bad_steps": 0}).max_bad_steps == 0
    with pytest.raises(ValueError, match=r"run.max_bad_steps=-1"):
        from_dict(RunConfig, {"max_bad_steps": -1})
