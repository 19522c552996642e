"""Weighted sum of named rewards for the GRPO trainer, with per-reward metrics.

total[i] = sum_r weight_r * value_r[i], a None value contributing 0. A reward that raises
on the batch is re-run one completion at a time so that a single bad completion gets None
and the rest keep their values (group-relative rewards such as `length` then see groups of
one); each exception kind is logged once per reward, and counted in `<name>/errors`.

Metrics of one call, per reward name: mean and std over the values that are not None,
`skipped` (count of None) and `skipped_frac`, `errors`, `seconds`, and the family's own
counters (e.g. `accuracy/timeouts`); plus `total/mean` and `total/std`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from openr1_mega.rl.rewards.registry import Reward, get_reward

logger = logging.getLogger(__name__)


@dataclass
class RewardSet:
    """Rewards with their weights, e.g. `RewardSet.from_spec({"accuracy": 1.0, "format": 0.2})`.

    `errors` counts, per reward name, the completions that got None because the reward
    raised, over the life of the set.
    """

    rewards: list[Reward]
    weights: list[float]
    errors: dict[str, int] = field(default_factory=dict)
    _logged: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def from_spec(cls, weights: Mapping[str, float],
                  params: Mapping[str, Mapping[str, Any]] | None = None) -> RewardSet:
        """Build from {name: weight} and optional {name: {option: value}}.

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
        return cls(rewards=rewards, weights=[float(w) for w in weights.values()])

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


def _valid(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


def _checked(values: Any, n: int) -> list[float | None]:
    if not isinstance(values, list) or len(values) != n:
        size = len(values) if isinstance(values, list) else type(values).__name__
        raise TypeError(f"a reward must return a list of {n} values, got {size}")
    bad = [v for v in values if not _valid(v)]
    if bad:
        raise ValueError(f"a reward returned a value that is not a finite number or None: "
                         f"{bad[0]!r}")
    return [None if v is None else float(v) for v in values]


def _one(reward: Reward, completions: list[str], columns: Mapping[str, Sequence[Any]],
         i: int) -> list[float | None]:
    row = {name: [values[i]] for name, values in columns.items()}
    return _checked(reward([completions[i]], **row), 1)


def _evaluate(reward_set: RewardSet, reward: Reward, completions: list[str],
              columns: Mapping[str, Sequence[Any]]) -> tuple[list[float | None], int]:
    """The reward's values; on an exception, element-wise with None where it raises."""
    try:
        return _checked(reward(completions, **columns), len(completions)), 0
    except Exception as exc:  # noqa: BLE001 - a reward bug must not end the run
        reward_set.log_once(reward.name, exc)
    values: list[float | None] = []
    errors = 0
    for i in range(len(completions)):
        try:
            values.extend(_one(reward, completions, columns, i))
        except Exception as exc:  # noqa: BLE001 - same: this completion gets None
            reward_set.log_once(reward.name, exc)
            values.append(None)
            errors += 1
    return values, errors


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _metrics(name: str, values: list[float | None], errors: int, seconds: float,
             extra: dict[str, float]) -> dict[str, float]:
    present = [v for v in values if v is not None]
    mean, std = _mean_std(present)
    skipped = len(values) - len(present)
    metrics = {"mean": mean, "std": std, "skipped": float(skipped),
               "skipped_frac": skipped / len(values) if values else 0.0,
               "errors": float(errors), "seconds": seconds, **extra}
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
        values, errors = _evaluate(reward_set, reward, completions, columns)
        seconds = time.perf_counter() - start
        reward_set.errors[reward.name] = reward_set.errors.get(reward.name, 0) + errors
        per_reward[reward.name] = values
        metrics.update(_metrics(reward.name, values, errors, seconds, reward.take_metrics()))
        totals = [t + weight * v if v is not None else t for t, v in zip(totals, values)]
    metrics["total/mean"], metrics["total/std"] = _mean_std(totals)
    return totals, per_reward, metrics
