"""Rewards that raise, hang past their limit or return NaN/inf give None, are counted, and the
step goes on (issue 13, §2; rl/rewards/combine.py)."""

from __future__ import annotations

import logging

import pytest

from openr1_mega.config.load import from_dict


def _register_bad_rewards():
    import threading

    from openr1_mega.rl.rewards import register, reward_names

    if "test_bad_hang" in reward_names():
        return
    release = threading.Event()

    @register("test_bad_hang")
    def _hang(marker: str = "HANG"):
        def reward(completions, **columns):
            if any(marker in c for c in completions):
                release.wait()  # stands for a parser stuck in C code: no signal reaches it
            return [1.0] * len(completions)

        reward.release = release
        return reward

    @register("test_bad_values")
    def _values():
        table = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}

        def reward(completions, **columns):
            if "raise" in completions:
                raise ZeroDivisionError("bad completion")
            return [table.get(c, 0.5) for c in completions]

        return reward


def test_raising_and_non_finite_rewards_give_none_and_are_counted():
    from openr1_mega.rl.rewards import RewardSet

    _register_bad_rewards()
    rewards = RewardSet.from_spec({"test_bad_values": 1.0, "format": 1.0}, timeout=30.0)
    totals, values, metrics = rewards(["ok", "nan", "inf", "-inf", "raise"], {})
    assert values["test_bad_values"] == [0.5, None, None, None, None]
    assert metrics["test_bad_values/nonfinite"] == 3.0
    assert metrics["test_bad_values/errors"] == 4.0  # 3 non-finite + 1 raised
    assert values["format"] == [0.0] * 5 and totals == [0.5, 0.0, 0.0, 0.0, 0.0]


def test_hanging_reward_is_cut_at_its_limit_and_the_step_goes_on(caplog):
    import threading

    from openr1_mega.rl.rewards import RewardSet

    _register_bad_rewards()
    rewards = RewardSet.from_spec({"test_bad_hang": 1.0, "format": 1.0}, timeout=0.2)
    hang = rewards.rewards[0].fn
    threads = threading.active_count()
    with caplog.at_level(logging.WARNING, logger="openr1_mega.rl.rewards.combine"):
        totals, values, metrics = rewards(["a HANG", "b"], {})
    assert values["test_bad_hang"] == [None, None] and values["format"] == [0.0, 0.0]
    assert metrics["test_bad_hang/deadline_misses"] == 2.0 and totals == [0.0, 0.0]
    assert "did not finish 2 completions within 0.2 s" in caplog.records[0].getMessage()
    # while the stuck call runs, the reward is skipped, not started again in a new thread
    _, values, metrics = rewards(["c", "d"], {})
    assert values["test_bad_hang"] == [None, None] and threading.active_count() == threads + 1
    hang.release.set()
    rewards._stalled["test_bad_hang"].join(5)
    _, values, metrics = rewards(["c", "d"], {})
    assert values["test_bad_hang"] == [1.0, 1.0] and metrics["test_bad_hang/deadline_misses"] == 0


def test_reward_timeout_is_a_recipe_field():
    from openr1_mega.config.train import GrpoConfig

    assert from_dict(GrpoConfig, {"reward_timeout": 30}).reward_timeout == 30.0
    with pytest.raises(ValueError, match=r"grpo.reward_timeout=0"):
        from_dict(GrpoConfig, {"reward_timeout": 0})
