"""Reasoning-steps reward: credit for explicit step markers, capped at 1.0.

Markers (open-r1): "Step N:", a line starting "N.", a line starting "-" or "*", and the
words "First,", "Second,", "Next,", "Finally,". Reward = min(1, markers / min_steps).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from openr1_mega.rl.rewards.registry import RewardFn, register

_STEP_MARKERS = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)",
                           re.MULTILINE)


@register("reasoning_steps")
def reasoning_steps(min_steps: int = 3) -> RewardFn:
    """min(1, number of step markers / min_steps)."""
    if min_steps < 1:
        raise ValueError(f"min_steps must be >= 1, got {min_steps}")

    def reward(completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        return [min(1.0, len(_STEP_MARKERS.findall(c)) / min_steps) for c in completions]

    return reward
