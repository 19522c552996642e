"""Length-shaping rewards: cosine-scaled, soft overlong punishment (DAPO), Kimi 1.5 length.

Lengths: the `completion_lengths` column (tokens, one int per completion) when the batch
has it (the GRPO trainer passes it), else the number of characters of each completion,
so pass the column whenever a length limit is meant in tokens.

- cosine (Wang et al. 2025, open-r1): progress p = min(L / max_len, 1);
  correct: min_value_correct + (max_value_correct - min_value_correct) * (1 + cos(pi p)) / 2
  (shorter is better); wrong: max_value_wrong + (min_value_wrong - max_value_wrong) *
  (1 + cos(pi p)) / 2 (longer is better: a long wrong attempt is punished less).
- soft_overlong_punishment (DAPO): 0 for L <= Lmax - Lcache; (Lmax - Lcache - L) / Lcache
  for Lmax - Lcache < L <= Lmax; -1 beyond Lmax.
- length (Kimi 1.5): within a group of completions of one prompt, lam = 0.5 - (L - min L) /
  (max L - min L); correct -> lam, wrong -> min(0, lam); all 0 when every length is equal.
Correctness comes from the accuracy reward's verification (same cache, so it runs once);
a completion whose gold answer cannot be parsed gets None.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from openr1_mega.rl.rewards.accuracy import gold_column_of, score_accuracy
from openr1_mega.rl.rewards.registry import RewardFn, register

logger = logging.getLogger(__name__)


def completion_lengths_of(completions: list[str], columns: dict[str, Sequence[Any]]) -> list[int]:
    """Token counts from the `completion_lengths` column, else character counts."""
    lengths = columns.get("completion_lengths")
    if lengths is None:
        return [len(c) for c in completions]
    if len(lengths) != len(completions):
        raise ValueError(f"completion_lengths has {len(lengths)} entries for "
                         f"{len(completions)} completions")
    return [int(n) for n in lengths]


def _correctness(completions: list[str], columns: dict[str, Sequence[Any]],
                 options: dict[str, Any]) -> list[float | None]:
    golds = gold_column_of(columns, options["gold_column"])
    scores, _ = score_accuracy(completions, golds, workers=options["workers"],
                               timeout=options["timeout"], boxed=options["boxed"])
    return scores


def cosine_scaled(length: int, correct: bool, max_len: int, min_value_wrong: float,
                  max_value_wrong: float, min_value_correct: float,
                  max_value_correct: float) -> float:
    """The cosine-scaled reward of one completion (see the module docstring)."""
    progress = min(length / max_len, 1.0)
    if correct:
        low, high = min_value_correct, max_value_correct
    else:
        low, high = max_value_wrong, min_value_wrong
    return low + 0.5 * (high - low) * (1.0 + math.cos(math.pi * progress))


@register("cosine")
def cosine(min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
           min_value_correct: float = 0.5, max_value_correct: float = 1.0,
           max_len: int = 1000, gold_column: str = "answer", boxed: str = "all",
           workers: int = 2, timeout: float = 5.0) -> RewardFn:
    """Cosine-scaled length reward: short correct answers and long wrong ones score higher."""
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    if min_value_wrong > max_value_wrong or min_value_correct > max_value_correct:
        raise ValueError("need min_value_wrong <= max_value_wrong and min_value_correct <= "
                         f"max_value_correct, got {min_value_wrong}, {max_value_wrong}, "
                         f"{min_value_correct}, {max_value_correct}")
    options = {"gold_column": gold_column, "boxed": boxed, "workers": workers,
               "timeout": timeout}
    values = {"max_len": max_len, "min_value_wrong": min_value_wrong,
              "max_value_wrong": max_value_wrong, "min_value_correct": min_value_correct,
              "max_value_correct": max_value_correct}

    def reward(completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        lengths = completion_lengths_of(completions, columns)
        correct = _correctness(completions, columns, options)
        return [None if ok is None else cosine_scaled(n, ok == 1.0, **values)
                for n, ok in zip(lengths, correct)]

    return reward


def overlong_penalty(length: int, max_completion_length: int, soft_punish_cache: int) -> float:
    """DAPO's soft overlong punishment of one completion, in [-1, 0]."""
    free = max_completion_length - soft_punish_cache
    if length <= free:
        return 0.0
    if length <= max_completion_length:
        return (free - length) / soft_punish_cache
    return -1.0


@register("soft_overlong_punishment")
def soft_overlong_punishment(max_completion_length: int = 16384,
                             soft_punish_cache: int = 4096) -> RewardFn:
    """Linear penalty over the last `soft_punish_cache` tokens before the length limit."""
    if not 0 < soft_punish_cache <= max_completion_length:
        raise ValueError("need 0 < soft_punish_cache <= max_completion_length, got "
                         f"{soft_punish_cache} and {max_completion_length}")

    def reward(completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        return [overlong_penalty(n, max_completion_length, soft_punish_cache)
                for n in completion_lengths_of(completions, columns)]

    return reward


_warned_groups: set[str] = set()


def _groups(n: int, columns: dict[str, Sequence[Any]], group_column: str) -> list[list[int]]:
    """Indices grouped by the value of `group_column` (one group if the batch lacks it)."""
    if group_column not in columns:
        if group_column not in _warned_groups:
            _warned_groups.add(group_column)
            logger.warning("length reward: the batch has no %r column, so it is scored as one "
                           "group; pass group_column= naming a per-prompt field", group_column)
        return [list(range(n))]
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, key in enumerate(columns[group_column]):
        groups[repr(key)].append(i)
    return list(groups.values())


@register("length")
def length(group_column: str = "prompt", gold_column: str = "answer", boxed: str = "all",
           workers: int = 2, timeout: float = 5.0) -> RewardFn:
    """Kimi 1.5 group-relative length reward (completions grouped by `group_column`)."""
    options = {"gold_column": gold_column, "boxed": boxed, "workers": workers,
               "timeout": timeout}

    def reward(completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        lengths = completion_lengths_of(completions, columns)
        correct = _correctness(completions, columns, options)
        out: list[float | None] = [None] * len(completions)
        for group in _groups(len(completions), columns, group_column):
            shortest = min(lengths[i] for i in group)
            longest = max(lengths[i] for i in group)
            for i in group:
                if correct[i] is None:
                    continue
                if longest == shortest:
                    out[i] = 0.0
                    continue
                lam = 0.5 - (lengths[i] - shortest) / (longest - shortest)
                out[i] = lam if correct[i] == 1.0 else min(0.0, lam)
        return out

    return reward
