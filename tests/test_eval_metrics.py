"""pass@k, maj@k and their aggregation, against brute-force references."""

import itertools
import math
import statistics

import pytest

from openr1_mega.eval.metrics import (
    aggregate,
    default_ks,
    majority_score,
    pass_at_k,
    problem_metrics,
)


def _pass_at_k_enumerated(n, c, k):
    """Fraction of all k-subsets of n samples (c correct) holding at least one correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_enumerated(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_matches_binomials():
    n, c, k = 64, 7, 16
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError, match="must be in"):
        pass_at_k(n, c, k)


def test_majority_vote():
    answers = ["3", "4", "4", None, "3", "3"]
    scores = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert majority_score(answers, scores, 1) == 1.0
    assert majority_score(answers, scores, 3) == 0.0        # "4" x2 beats "3" x1
    assert majority_score(answers, scores, 5) == 1.0        # tie 2-2: "3" was seen first
    assert majority_score(answers, scores, 6) == 1.0
    assert majority_score([None, None], [0.0, 1.0], 2) == 0.0   # nobody voted


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(4) == [1, 2, 4]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(64) == [1, 2, 4, 8, 16, 32, 64]


def test_problem_metrics_and_aggregate():
    a = problem_metrics([1.0, 0.0, 1.0, 0.0], ["2", "5", "2", "5"], [1, 2, 4])
    assert a["pass@1"] == 0.5
    assert a["pass@2"] == pytest.approx(_pass_at_k_enumerated(4, 2, 2))
    assert a["pass@4"] == 1.0 and a["maj@4"] == 1.0 and a["maj@1"] == 1.0
    b = problem_metrics([0.0, 0.0, 0.0, 1.0], None, [1, 2, 4])
    assert "maj@1" not in b and b["pass@1"] == 0.25
    c = problem_metrics([1.0, 1.0], ["x", "x"], [1, 2, 4])      # k=4 > n: left out
    total = aggregate([a, b, c])
    assert total["pass@1"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert total["pass@1_stderr"] == pytest.approx(statistics.stdev([0.5, 0.25, 1.0]) / 3**0.5)
    assert "pass@4" not in total and "maj@1" not in total       # not every problem has them
    assert total["pass@2"] == pytest.approx((a["pass@2"] + b["pass@2"] + 1.0) / 3)
