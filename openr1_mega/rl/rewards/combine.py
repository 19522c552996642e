"""Weighted sum of named rewards for the GRPO trainer, with per-reward metrics.

total[i] = sum_r weight_r * value_r[i], a None value contributing 0. No reward can stop
the step:
  raises     the reward is re-run one completion at a time so that a single bad
             completion gets None and the rest keep their values (group-relative rewards
             such as `length` then see groups of one); each exception kind is logged
             once per reward and counted in `<name>/errors`;
  NaN / inf  that value becomes None, counted in `<name>/nonfinite` (and in errors);
  hangs      every call runs in a helper thread and is waited for at most `timeout`
             seconds (the whole batch, re-runs included); past it the batch's values are
             None, counted in `<name>/deadline_misses`. Python cannot kill a thread, so
             the stuck call is left running (daemon) and the reward is "stalled": until
             that call returns, its later calls are not started and give None (counted
             the same way), so a hung reward holds one thread, never one per step.
Rewards that do their work in rl/rewards/pool.py (accuracy, cosine, length, code) also
have a hard per-completion limit there (the worker process is killed); this deadline is
the backstop for everything else, including C code that no signal interrupts.

Metrics of one call, per reward name: mean and std over the values that are not None,
`skipped` (count of None) and `skipped_frac`, `errors`, `nonfinite`, `deadline_misses`,
`seconds`, and the family's own counters (e.g. `accuracy/timeouts`); plus `total/mean`
and `total/std`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from openr1_mega.rl.rewards.registry import Reward, get_reward

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
"""Backstop limit of one reward on one batch: above the pool's worst case for a step's
batch (completions / workers x per-completion limit) in the shipped recipes."""


@dataclass
class RewardSet:
    """Rewards with their weights, e.g. `RewardSet.from_spec({"accuracy": 1.0, "format": 0.2})`.

    `errors` counts, per reward name, the completions that got None because the reward
    raised, over the life of the set.
    """

    rewards: list[Reward]
    weights: list[float]
    timeout: float | None = DEFAULT_TIMEOUT_S
    """Seconds one reward may take on one batch; None runs it inline, unbounded."""
    errors: dict[str, int] = field(default_factory=dict)
    _logged: set[tuple[str, str]] = field(default_factory=set)
    _stalled: dict[str, threading.Thread] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"reward timeout must be > 0 seconds or None, got {self.timeout}")

    @classmethod
    def from_spec(cls, weights: Mapping[str, float],
                  params: Mapping[str, Mapping[str, Any]] | None = None,
                  timeout: float | None = DEFAULT_TIMEOUT_S) -> RewardSet:
        """Build from {name: weight}, optional {name: {option: value}} and the time limit.

        Raises:
            KeyError / TypeError: unknown reward name or option (see `get_reward`).
            ValueError: `params` names a reward that is not in `weights`, or a weight is
                not a finite number.
        """
        params = dict(params or {})
        stray = sorted(set(params) - set(weights))
        if stray:
            raise ValueError(f"params given for rewards {stray} that are not in the spec "
                             f"{sorted(weights)}")
        for name, weight in weights.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of reward {name!r} must be a finite number, "
                                 f"got {weight!r}")
        rewards = [get_reward(name, **params.get(name, {})) for name in weights]
        return cls(rewards=rewards, weights=[float(w) for w in weights.values()],
                   timeout=timeout)

    def __call__(self, completions: list[str], columns: Mapping[str, Sequence[Any]]
                 ) -> tuple[list[float], dict[str, list[float | None]], dict[str, float]]:
        """See `compute_rewards`."""
        return compute_rewards(self, completions, columns)

    def log_once(self, name: str, exc: Exception) -> None:
        kind = (name, type(exc).__name__)
        if kind not in self._logged:
            self._logged.add(kind)
            logger.warning("reward %r raised %s: %s (logged once per kind; the completion "
                           "gets None)", name, type(exc).__name__, exc)


def _check_columns(completions: list[str], columns: Mapping[str, Sequence[Any]]) -> None:
    for name, values in columns.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise TypeError(f"column {name!r} must be a list with one entry per completion")
        if len(values) != len(completions):
            raise ValueError(f"column {name!r} has {len(values)} entries for "
                             f"{len(completions)} completions")


@dataclass
class Outcome:
    """One reward's values on one batch and what went wrong on the way."""

    values: list[float | None]
    errors: int = 0
    nonfinite: int = 0
    deadline_misses: int = 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked(values: Any, n: int) -> tuple[list[float | None], int]:
    """(values with non-finite ones as None, how many were non-finite); raises on a wrong
    length or a value that is neither a number nor None."""
    if not isinstance(values, list) or len(values) != n:
        size = len(values) if isinstance(values, list) else type(values).__name__
        raise TypeError(f"a reward must return a list of {n} values, got {size}")
    bad = [v for v in values if v is not None and not _number(v)]
    if bad:
        raise TypeError(f"a reward returned a value that is not a number or None: {bad[0]!r}")
    out = [None if v is None or not math.isfinite(v) else float(v) for v in values]
    return out, sum(v is not None and not math.isfinite(v) for v in values)


def _one(reward: Reward, completions: list[str], columns: Mapping[str, Sequence[Any]],
         i: int) -> tuple[list[float | None], int]:
    row = {name: [values[i]] for name, values in columns.items()}
    return _checked(reward([completions[i]], **row), 1)


def _evaluate(reward_set: RewardSet, reward: Reward, completions: list[str],
              columns: Mapping[str, Sequence[Any]]) -> Outcome:
    """The reward's values; on an exception, element-wise with None where it raises."""
    try:
        values, nonfinite = _checked(reward(completions, **columns), len(completions))
        return Outcome(values, errors=nonfinite, nonfinite=nonfinite)
    except Exception as exc:  # noqa: BLE001 - a reward bug must not end the run
        reward_set.log_once(reward.name, exc)
    outcome = Outcome([])
    for i in range(len(completions)):
        try:
            values, nonfinite = _one(reward, completions, columns, i)
        except Exception as exc:  # noqa: BLE001 - same: this completion gets None
            reward_set.log_once(reward.name, exc)
            values, nonfinite = [None], 0
            outcome.errors += 1
        outcome.values.extend(values)
        outcome.errors += nonfinite
        outcome.nonfinite += nonfinite
    return outcome


def _bounded(reward_set: RewardSet, reward: Reward, completions: list[str],
             columns: Mapping[str, Sequence[Any]]) -> Outcome:
    """`_evaluate` in a helper thread, waited for at most `reward_set.timeout` seconds."""
    if reward_set.timeout is None:
        return _evaluate(reward_set, reward, completions, columns)
    missed = Outcome([None] * len(completions), deadline_misses=len(completions))
    stuck = reward_set._stalled.get(reward.name)
    if stuck is not None and stuck.is_alive():
        return missed
    result: list[Outcome] = []
    thread = threading.Thread(
        target=lambda: result.append(_evaluate(reward_set, reward, completions, columns)),
        name=f"reward-{reward.name}", daemon=True)
    thread.start()
    thread.join(reward_set.timeout)
    if thread.is_alive():
        reward_set._stalled[reward.name] = thread
        logger.warning("reward %r did not finish %d completions within %g s: they get None; "
                       "its later calls give None until this one returns", reward.name,
                       len(completions), reward_set.timeout)
        return missed
    return result[0] if result else Outcome([None] * len(completions),
                                            errors=len(completions))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _metrics(name: str, outcome: Outcome, seconds: float,
             extra: dict[str, float]) -> dict[str, float]:
    values = outcome.values
    present = [v for v in values if v is not None]
    mean, std = mean_std(present)
    skipped = len(values) - len(present)
    metrics = {"mean": mean, "std": std, "skipped": float(skipped),
               "skipped_frac": skipped / len(values) if values else 0.0,
               "errors": float(outcome.errors), "nonfinite": float(outcome.nonfinite),
               "deadline_misses": float(outcome.deadline_misses), "seconds": seconds,
               **extra}
    return {f"{name}/{key}": value for key, value in metrics.items()}


def compute_rewards(reward_set: RewardSet, completions: list[str],
                    columns: Mapping[str, Sequence[Any]]
                    ) -> tuple[list[float], dict[str, list[float | None]], dict[str, float]]:
    """Evaluate every reward of `reward_set` on a batch and combine them.

    Args:
        reward_set: the rewards and weights.
        completions: the generated texts, one per sample.
        columns: dataset fields and trainer data, one entry per completion each (e.g.
            `answer`, `test_cases`, `prompt`, `completion_lengths`).

    Returns:
        (totals, values, metrics): the weighted sum per completion, each reward's values
        (None = skipped), and the metrics described in the module docstring.
    """
    _check_columns(completions, columns)
    totals = [0.0] * len(completions)
    per_reward: dict[str, list[float | None]] = {}
    metrics: dict[str, float] = {}
    for reward, weight in zip(reward_set.rewards, reward_set.weights):
        start = time.perf_counter()
        outcome = _bounded(reward_set, reward, completions, columns)
        seconds = time.perf_counter() - start
        reward_set.errors[reward.name] = reward_set.errors.get(reward.name, 0) + outcome.errors
        per_reward[reward.name] = values = outcome.values
        extra = {} if outcome.deadline_misses else reward.take_metrics()
        metrics.update(_metrics(reward.name, outcome, seconds, extra))
        totals = [t + weight * v if v is not None else t for t, v in zip(totals, values)]
    metrics["total/mean"], metrics["total/std"] = mean_std(totals)
    return totals, per_reward, metrics
