"""Benchmark metrics over n samples per problem: pass@1, unbiased pass@k, maj@k.

Definitions (per problem with n samples of which c are correct; then averaged over problems):
  pass@1 = c / n, the mean score over the n samples (DeepSeek-R1 / lighteval `pass@1:n`).
  pass@k = 1 - C(n - c, k) / C(n, k), the unbiased estimator of Chen et al. 2021 (Codex):
           the probability that at least one of k samples drawn without replacement from
           the n is correct. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which has no
           huge binomials.
  maj@k  = score of the most frequent extracted answer among the first k samples (ties go
           to the answer seen first; samples with no extracted answer do not vote).
Pure functions: no I/O, no engine.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `n` samples of which `c` are correct.

    Raises:
        ValueError: when not 0 <= c <= n or not 1 <= k <= n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"correct count c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_score(answers: Sequence[str | None], scores: Sequence[float], k: int) -> float:
    """maj@k for one problem: the score of the majority answer among the first k samples.

    Args:
        answers: extracted final answer of each sample (a normalised string), None if none.
        scores: score of each sample (1.0 correct, 0.0 wrong), aligned with `answers`.
        k: number of leading samples that vote.
    """
    if len(answers) != len(scores):
        raise ValueError(f"got {len(answers)} answers but {len(scores)} scores")
    if not 1 <= k <= len(answers):
        raise ValueError(f"k must be in [1, {len(answers)}], got {k}")
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(a for a in answers[:k] if a is not None and votes[a] == top)
    return float(scores[answers.index(winner)])


def default_ks(n: int) -> list[int]:
    """The k values reported for n samples: powers of two up to n, and n itself."""
    ks = {1, n}
    k = 2
    while k < n:
        ks.add(k)
        k *= 2
    return sorted(ks)


def problem_metrics(scores: Sequence[float], answers: Sequence[str | None] | None,
                    ks: Sequence[int]) -> dict[str, float]:
    """pass@1, pass@k and maj@k (when answers are given) for one problem's samples."""
    n = len(scores)
    if n == 0:
        raise ValueError("a problem needs at least one scored sample")
    correct = sum(1 for s in scores if s >= 1.0)
    out = {"pass@1": sum(scores) / n}
    for k in ks:
        if k > n:
            continue
        if k > 1:
            out[f"pass@{k}"] = pass_at_k(n, correct, k)
        if answers is not None:
            out[f"maj@{k}"] = majority_score(answers, scores, k)
    return out


def aggregate(per_problem: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over problems, plus the standard error of pass@1.

    A metric is averaged only when every problem has it (e.g. pass@8 needs n >= 8 for all).
    """
    if not per_problem:
        return {}
    names = [m for m in per_problem[0] if all(m in p for p in per_problem)]
    out = {m: sum(p[m] for p in per_problem) / len(per_problem) for m in names}
    values = [p["pass@1"] for p in per_problem]
    if len(values) > 1:
        mean = out["pass@1"]
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        out["pass@1_stderr"] = math.sqrt(var / len(values))
    return out
