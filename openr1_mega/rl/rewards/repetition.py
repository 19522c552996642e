"""Repetition penalty: a negative reward proportional to the share of repeated word n-grams.

Algorithm (open-r1): words = completion.lower().split(); with T n-grams of which U are
distinct, reward = (1 - U / T) * max_penalty (max_penalty <= 0). Texts shorter than one
n-gram get 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from openr1_mega.rl.rewards.registry import RewardFn, register


def repeated_fraction(text: str, ngram_size: int) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0 for short texts)."""
    words = text.lower().split()
    total = len(words) - ngram_size + 1
    if total <= 0:
        return 0.0
    distinct = len(set(zip(*(words[i:] for i in range(ngram_size)))))
    return 1.0 - distinct / total


@register("repetition_penalty")
def repetition_penalty(ngram_size: int = 3, max_penalty: float = -1.0) -> RewardFn:
    """(share of repeated n-grams) * max_penalty, in [max_penalty, 0]."""
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be >= 1, got {ngram_size}")
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be <= 0, got {max_penalty}")

    def reward(completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        fractions = [repeated_fraction(c, ngram_size) for c in completions]
        return [f * max_penalty if f else 0.0 for f in fractions]

    return reward
