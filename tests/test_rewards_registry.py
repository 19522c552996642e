"""Registry and combiner: names and options checked, weighted sums, None and error handling."""

from __future__ import annotations

import logging
import math

import pytest

from openr1_mega.rl.rewards import (
    RewardSet,
    compute_rewards,
    get_reward,
    register,
    reward_names,
    reward_params,
)

EXPECTED = {"accuracy", "code", "cosine", "format", "length", "reasoning_steps",
            "repetition_penalty", "soft_format", "soft_overlong_punishment", "tag_count"}


@register("test_flaky")
def _flaky(bad_marker: str = "BAD") -> object:
    """Raises on any batch containing `bad_marker`; otherwise scores 1.0 (0.5 for "half")."""

    def reward(completions, **columns):
        if any(bad_marker in c for c in completions):
            raise RuntimeError(f"cannot score {bad_marker}")
        return [0.5 if c == "half" else 1.0 for c in completions]

    return reward


@register("test_skip_empty")
def _skip_empty() -> object:
    def reward(completions, **columns):
        return [None if not c else 2.0 for c in completions]

    return reward


@register("test_nan")
def _nan() -> object:
    def reward(completions, **columns):
        return [float("nan") if c == "nan" else 0.0 for c in completions]

    return reward


def test_all_families_are_registered():
    assert EXPECTED <= set(reward_names())
    assert reward_params("cosine")["max_len"] == 1000


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError, match="accuracy") as info:
        get_reward("acuracy")
    assert "acuracy" in str(info.value)


def test_unknown_param_lists_valid_options():
    with pytest.raises(TypeError, match="max_lenght") as info:
        get_reward("cosine", max_lenght=10)
    assert "max_len" in str(info.value) and "min_value_wrong" in str(info.value)


def test_params_are_bound_and_unknown_columns_ignored():
    reward = get_reward("cosine", min_value_wrong=-0.5, max_len=1000)
    assert reward.params == {"min_value_wrong": -0.5, "max_len": 1000}
    values = reward(["\\boxed{3}"], answer=["3"], completion_lengths=[0], unknown=["x"])
    assert values == [pytest.approx(1.0)]


def test_invalid_option_values_name_the_option():
    with pytest.raises(ValueError, match="max_penalty"):
        get_reward("repetition_penalty", max_penalty=0.5)
    with pytest.raises(ValueError, match="boxed"):
        get_reward("accuracy", boxed="first")


def test_weighted_sum_with_none_counted_as_skipped():
    rewards = RewardSet.from_spec({"test_flaky": 1.0, "test_skip_empty": 0.25})
    totals, values, metrics = rewards(["half", "", "ok"], {"answer": ["1", "2", "3"]})
    assert values["test_skip_empty"] == [2.0, None, 2.0]
    assert totals == [0.5 + 0.5, 1.0, 1.0 + 0.5]
    assert metrics["test_skip_empty/skipped"] == 1.0
    assert metrics["test_skip_empty/skipped_frac"] == pytest.approx(1 / 3)
    assert metrics["test_skip_empty/mean"] == 2.0 and metrics["test_skip_empty/std"] == 0.0
    assert metrics["test_flaky/mean"] == pytest.approx(2.5 / 3)
    assert metrics["test_flaky/errors"] == 0.0 and metrics["test_flaky/seconds"] >= 0.0
    assert metrics["total/mean"] == pytest.approx(sum(totals) / 3)


def test_one_bad_completion_does_not_poison_the_batch(caplog):
    rewards = RewardSet.from_spec({"test_flaky": 2.0})
    batch = ["a", "BAD one", "half", "BAD two"]
    with caplog.at_level(logging.WARNING, logger="openr1_mega.rl.rewards.combine"):
        totals, values, metrics = compute_rewards(rewards, batch, {})
        compute_rewards(rewards, batch, {})
    assert values["test_flaky"] == [1.0, None, 0.5, None]
    assert totals == [2.0, 0.0, 1.0, 0.0]
    assert metrics["test_flaky/errors"] == 2.0 and metrics["test_flaky/skipped"] == 2.0
    assert rewards.errors == {"test_flaky": 4}
    logged = [r for r in caplog.records if "RuntimeError" in r.getMessage()]
    assert len(logged) == 1 and "cannot score BAD" in logged[0].getMessage()


def test_non_finite_value_becomes_none_and_an_error():
    rewards = RewardSet.from_spec({"test_nan": 1.0})
    _, values, metrics = rewards(["nan", "x"], {})
    assert values["test_nan"] == [None, 0.0]
    assert metrics["test_nan/errors"] == 1.0


def test_missing_column_gives_none_for_all_not_a_crash():
    rewards = RewardSet.from_spec({"accuracy": 1.0, "format": 1.0}, params={"accuracy": {
        "workers": 0}})
    completion = "<think>\nhm\n</think>\n<answer>\n1\n</answer>"
    totals, values, metrics = rewards([completion], {"solution": ["1"]})
    assert values["accuracy"] == [None] and metrics["accuracy/errors"] == 1.0
    assert totals == [1.0] and math.isnan(metrics["accuracy/mean"])


def test_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="cosine"):
        RewardSet.from_spec({"accuracy": 1.0}, params={"cosine": {"max_len": 10}})
    with pytest.raises(ValueError, match="format"):
        RewardSet.from_spec({"format": float("inf")})
    rewards = RewardSet.from_spec({"format": 1.0})
    with pytest.raises(ValueError, match="answer"):
        rewards(["a", "b"], {"answer": ["1"]})
    with pytest.raises(TypeError, match="answer"):
        rewards(["a"], {"answer": "1"})
