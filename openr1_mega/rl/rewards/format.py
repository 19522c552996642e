"""Format rewards for the R1 template `<think>reasoning</think> <answer>final</answer>`.

- format: 1.0 if the whole completion is one think block then one answer block (whitespace
  around and between them allowed, both non-empty, no other tag), else 0.0.
- soft_format: 1.0 if a think block followed by an answer block appears anywhere.
- tag_count: 0.25 for each of `<think>\\n`, `\\n</think>\\n`, `\\n<answer>\\n`, `\\n</answer>`
  that occurs exactly once (open-r1's partial credit, which also rewards the newlines).
Tags are configurable. `prompt_opens_think=True` is for chat templates whose generation
prompt already ends with `<think>\\n` (R1-Distill, Qwen3): the completion then starts
inside the think block, and the opening tag is counted as present.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from openr1_mega.rl.rewards.registry import RewardFn, register


def _check_tag(name: str, tag: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][\w\-]*", tag):
        raise ValueError(f"{name} must be a plain tag name such as 'think', got {tag!r}")


def _opened(completion: str, think_tag: str, prompt_opens_think: bool) -> str:
    return f"<{think_tag}>\n{completion}" if prompt_opens_think else completion


@register("format")
def format_reward(think_tag: str = "think", answer_tag: str = "answer",
                  prompt_opens_think: bool = False) -> RewardFn:
    """Strict R1 template: the completion is exactly a think block then an answer block."""
    _check_tag("think_tag", think_tag)
    _check_tag("answer_tag", answer_tag)
    t, a = re.escape(think_tag), re.escape(answer_tag)
    pattern = re.compile(rf"\s*<{t}>(.*?)</{t}>\s*<{a}>(.*?)</{a}>\s*", re.DOTALL)
    tags = [f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>"]

    def score(completion: str) -> float:
        text = _opened(completion, think_tag, prompt_opens_think)
        if any(text.count(tag) != 1 for tag in tags):  # first: keeps the regex linear
            return 0.0
        match = pattern.fullmatch(text)
        if match is None:
            return 0.0
        return 1.0 if match.group(1).strip() and match.group(2).strip() else 0.0

    def reward(completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        return [score(c) for c in completions]

    return reward


@register("soft_format")
def soft_format(think_tag: str = "think", answer_tag: str = "answer",
                prompt_opens_think: bool = False) -> RewardFn:
    """Lenient R1 template: a think block followed by an answer block somewhere."""
    _check_tag("think_tag", think_tag)
    _check_tag("answer_tag", answer_tag)
    t, a = re.escape(think_tag), re.escape(answer_tag)
    handover = re.compile(rf"</{t}>\s*<{a}>")

    def score(completion: str) -> float:
        # same as searching <think>.*?</think>\s*<answer>.*?</answer>, in linear time
        text = _opened(completion, think_tag, prompt_opens_think)
        start = text.find(f"<{think_tag}>")
        middle = handover.search(text, start + len(think_tag) + 2) if start >= 0 else None
        return 1.0 if middle and text.find(f"</{answer_tag}>", middle.end()) >= 0 else 0.0

    def reward(completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        return [score(c) for c in completions]

    return reward


@register("tag_count")
def tag_count(think_tag: str = "think", answer_tag: str = "answer",
              prompt_opens_think: bool = False) -> RewardFn:
    """0.25 per template tag (with its newlines) that occurs exactly once."""
    _check_tag("think_tag", think_tag)
    _check_tag("answer_tag", answer_tag)
    pieces = (f"<{think_tag}>\n", f"\n</{think_tag}>\n", f"\n<{answer_tag}>\n",
              f"\n</{answer_tag}>")

    def score(completion: str) -> float:
        text = _opened(completion, think_tag, prompt_opens_think)
        return 0.25 * sum(text.count(piece) == 1 for piece in pieces)

    def reward(completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        return [score(c) for c in completions]

    return reward
