"""Score completions of one task: a score per completion plus the answer that votes in maj@k.

What is scored is the completion's final part: the text after the last `</think>` when the
reasoning is closed (lighteval strips reasoning blocks the same way), else the whole text.
  math    `rl.rewards.score_accuracy` (math-verify), the very code path of the GRPO accuracy
          reward; the vote key is the last \\boxed{} content, whitespace-normalised.
  choice  the answer letter ("Answer: X", \\boxed{X}, "answer is (X)", else a lone letter on
          the last line) compared with the gold letter.
  code    the last fenced Python block run against the problem's test cases by the rewards
          sandbox; 1.0 only when every test passes (LiveCodeBench pass@1).
A score of None ("cannot verify", e.g. an unparseable gold answer) counts as 0.0 in the
metrics and is reported as `unverifiable`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from openr1_mega.eval.lcb_data import extract_code, sandbox_case


@dataclass(frozen=True)
class ScoringConfig:
    """How completions are verified."""

    workers: int = 2
    """Verification processes (math-verify / sandbox); 0 runs math-verify in this process."""
    timeout: float = 5.0
    """Seconds per math-verify call; past it the completion scores 0.0."""
    code_timeout: float = 10.0
    """Wall seconds per code test case in the sandbox."""

    def __post_init__(self):
        if self.workers < 0:
            raise ValueError(f"scoring.workers must be >= 0, got {self.workers}")
        if self.timeout <= 0 or self.code_timeout <= 0:
            raise ValueError("scoring.timeout and scoring.code_timeout must be > 0")


@dataclass
class Scored:
    """Scores and vote keys of a batch of completions, with verification counters."""

    scores: list[float | None]
    answers: list[str | None]
    counts: dict[str, int] = field(default_factory=dict)


def final_part(completion: str) -> str:
    """The text after the last `</think>`, or the whole completion when there is none."""
    return completion.rsplit("</think>", 1)[-1]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces, or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None


def math_vote_key(completion: str) -> str | None:
    """The answer that votes in maj@k: the last boxed content without spaces or \\left/\\right."""
    boxed = last_boxed(final_part(completion))
    if boxed is None:
        return None
    key = re.sub(r"\\left|\\right|\\!|\\,|\s+", "", boxed).replace("dfrac", "frac")
    return key.rstrip(".") or None


_LETTER_PATTERNS = [
    re.compile(r"answer\s*(?:is|:)\s*[*_$\s]*(?:\\boxed\{|\\text\{|\\textbf\{)?\s*\(?([A-D])\)?"
               r"(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-D])\)?"),
]
_LONE_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-D])\)?(?![A-Za-z])")


def extract_letter(completion: str) -> str | None:
    """The multiple-choice letter of a completion (A-D), or None when it gives none."""
    text = final_part(completion)
    for pattern in _LETTER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    found = _LONE_LETTER.findall(lines[-1]) if lines else []
    return found[-1] if found else None


def score_math(completions: Sequence[str], golds: Sequence[Any],
               config: ScoringConfig) -> Scored:
    """math-verify each completion's final part against its gold answer."""
    from openr1_mega.rl.rewards import score_accuracy

    scores, counts = score_accuracy([final_part(c) for c in completions], list(golds),
                                    workers=config.workers, timeout=config.timeout)
    return Scored(scores, [math_vote_key(c) for c in completions], counts)


def score_choice(completions: Sequence[str], gold_letters: Sequence[str]) -> Scored:
    """1.0 when the extracted letter equals the gold letter."""
    letters = [extract_letter(c) for c in completions]
    scores = [float(letter == gold) for letter, gold in zip(letters, gold_letters)]
    return Scored(scores, letters, {})


def score_code(completions: Sequence[str], rows: Sequence[dict[str, Any]],
               config: ScoringConfig) -> Scored:
    """All-or-nothing: the last code block passes every test of its row, in the sandbox of
    the GRPO code reward (`rl.rewards` "code", scoring="binary")."""
    from openr1_mega.rl.rewards import get_reward

    reward = get_reward("code", scoring="binary", workers=max(config.workers, 1),
                        wall_seconds=config.code_timeout,
                        cpu_seconds=max(1, math.ceil(config.code_timeout)))
    programs = [extract_code(c) for c in completions]
    scores: list[float | None] = [0.0] * len(completions)
    todo = [i for i, p in enumerate(programs) if p is not None]
    cases = [sandbox_case(programs[i], rows[i]) for i in todo]
    results = reward([f"```python\n{program}\n```" for program, _ in cases],
                     test_cases=[tests for _, tests in cases])
    for i, result in zip(todo, results):
        scores[i] = result
    counts = {"no_code": len(programs) - len(todo), **reward.take_metrics()}
    return Scored(scores, [None] * len(completions), counts)


def score(kind: str, completions: Sequence[str], rows: Sequence[dict[str, Any]],
          config: ScoringConfig | None = None) -> Scored:
    """Score completions[i] against rows[i] (the problem it answers) for a task of `kind`."""
    config = config or ScoringConfig()
    if len(completions) != len(rows):
        raise ValueError(f"got {len(completions)} completions but {len(rows)} rows")
    if kind == "math":
        return score_math(completions, [r["answer"] for r in rows], config)
    if kind == "choice":
        return score_choice(completions, [r["gold_letter"] for r in rows])
    if kind == "code":
        return score_code(completions, rows, config)
    raise ValueError(f"kind must be math, choice or code, got {kind!r}")
