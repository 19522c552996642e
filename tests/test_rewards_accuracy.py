"""Accuracy reward on real math-verify: equivalent forms, tricky texts, time limits, workers."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

import psutil
import pytest
from math_verify import parse

from openr1_mega.rl.rewards import get_reward, score_accuracy, verify_answer
from openr1_mega.rl.rewards.accuracy import (
    KILL_GRACE_S,
    _answer_config,
    _parse_gold,
    _verify_with_status,
    clear_cache,
)
from openr1_mega.rl.rewards.pool import shared_pool

MATH500 = Path(__file__).resolve().parents[1] / "data/math500.jsonl"
# sympy spends seconds on each of these before our alarm stops it
ADVERSARIAL = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{10^{10^{10}}}", "\\boxed{99999999!}",
               "\\boxed{\\int_0^\\infty e^{-x^{99}}\\sin(x^{77}) dx}"]

CASES = [  # (completion, gold, expected)
    ("so \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("so \\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
    ("The answer is 0.5", "\\frac12", 1.0),
    ("\\boxed{\\frac{2}{4}}", "0.5", 1.0),
    ("\\boxed{0.51}", "\\frac{1}{2}", 0.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{0.5}", "50\\%", 1.0),
    ("\\boxed{10 \\text{ cm}}", "10", 1.0),
    ("\\boxed{10}", "10\\text{ cm}", 1.0),
    ("\\boxed{11}", "10\\text{ cm}", 0.0),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", 1.0),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1.0),
    ("\\boxed{\\text{Bob}}", "\\text{Evelyn}", 0.0),
    ("\\boxed{\\$18.90}", "\\$18.90", 1.0),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    ("so x is $3$, and finally \\boxed{4}", "4", 1.0),
    ("no answer at all", "5", 0.0),
    ("", "5", 0.0),
    ("答案是 \\boxed{3}。", "3", 1.0),
    ("Ответ: $\\frac{1}{2}$ ✓ 🎉", "\\frac12", 1.0),
    ("\\boxed{", "3", 0.0),
    ("$$$$\\boxed{}}}}{{{\\frac{", "3", 0.0),
]


@pytest.mark.parametrize("completion, gold, expected", CASES)
def test_equivalence_and_tricky_texts(completion, gold, expected):
    assert verify_answer(completion, gold) == expected


def test_multiple_boxed_answers():
    hedge = "maybe \\boxed{1}, or rather \\boxed{2}"
    assert verify_answer(hedge, "2") == 0.0  # "all": the answer is the set {1, 2}
    assert verify_answer(hedge, "1, 2") == 1.0
    assert verify_answer(hedge, "2", boxed="last") == 1.0
    assert verify_answer(hedge, "1", boxed="last") == 0.0


def test_unparseable_or_missing_gold_is_none():
    assert verify_answer("\\boxed{3}", "") is None
    assert verify_answer("\\boxed{3}", None) is None
    scores, _ = score_accuracy(["\\boxed{3}", "\\boxed{3}"], [None, "3"], workers=0)
    assert scores == [None, 1.0]


def test_100k_character_completions():
    long_correct = "x " * 50_000 + "so \\boxed{42}"
    long_math = "$x$ " * 25_000 + " \\boxed{42}"
    scores, counts = score_accuracy([long_correct, long_math, "y" * 100_000],
                                    ["42", "42", "42"], workers=2)
    assert scores == [1.0, 1.0, 0.0] and counts["timeouts"] == 0


def test_soft_time_limit_in_this_process():
    start = time.monotonic()
    assert _verify_with_status(ADVERSARIAL[0], "1", "all", 0.3) == (0.0, "timeout")
    assert time.monotonic() - start < 0.3 + KILL_GRACE_S


def test_adversarial_latex_times_out_in_workers_without_leaks():
    clear_cache()
    score_accuracy(["\\boxed{1}"], ["1"], workers=2)  # pool started before we count
    threads = threading.active_count()
    start = time.monotonic()
    scores, counts = score_accuracy(ADVERSARIAL + ["\\boxed{2}"], ["1"] * 4 + ["2"],
                                    workers=2, timeout=0.5)
    elapsed = time.monotonic() - start
    pool = shared_pool(_verify_with_status, 2)
    assert scores == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert counts == {"timeouts": 4, "crashes": 0}
    # 4 timed-out tasks on 2 workers: two rounds of at most timeout + grace each
    assert elapsed < 2 * (0.5 + KILL_GRACE_S) + 5.0
    assert threading.active_count() == threads
    assert len(pool.pids()) == 2 and all(psutil.pid_exists(p) for p in pool.pids())
    workers = [c for c in psutil.Process().children() if c.pid in pool.pids()]
    assert len(workers) == 2


def test_verify_in_a_thread_works_without_alarm():
    result = []
    thread = threading.Thread(target=lambda: result.append(verify_answer("\\boxed{7}", "7")))
    thread.start()
    thread.join()
    assert result == [1.0]


def _score_in_child(batch: tuple) -> tuple:
    return score_accuracy(*batch, workers=1, timeout=0.5)


def test_pool_works_from_a_thread_and_from_a_daemon_process():
    batch = (["\\boxed{2}", ADVERSARIAL[0]], ["2", "1"])
    expected = ([1.0, 0.0], {"timeouts": 1, "crashes": 0})
    out = []
    thread = threading.Thread(target=lambda: out.append(_score_in_child(batch)))
    thread.start()
    thread.join()
    assert out == [expected]
    with mp.get_context("spawn").Pool(1) as pool:  # pool processes are daemonic
        assert pool.apply(_score_in_child, (batch,)) == expected


def test_registered_reward_counts_timeouts_and_uses_the_gold_column():
    reward = get_reward("accuracy", gold_column="solution", timeout=0.5)
    clear_cache()
    values = reward(["\\boxed{2}", ADVERSARIAL[1]], solution=["2", "1"], answer=["9", "9"])
    assert values == [1.0, 0.0]
    assert reward.take_metrics() == {"timeouts": 1.0, "crashes": 0.0}
    assert reward.take_metrics() == {"timeouts": 0.0, "crashes": 0.0}


def _explain(row: dict, score: float | None) -> str:
    """Why a gold solution missed: what math-verify made of the gold and of the solution."""
    gold = _parse_gold(row["answer"])
    answer = parse(row["solution"], _answer_config("all"), parsing_timeout=None)
    reason = "unparseable gold" if score is None else "not equivalent or timed out"
    return f"{row['id']}: {reason}; gold {row['answer']!r} -> {gold}, solution -> {answer}"


def test_math500_gold_solutions_are_accepted(capsys):
    """The oracle: each MATH-500 reference solution must verify against its own answer."""
    rows = [json.loads(line) for line in MATH500.read_text().splitlines() if line.strip()]
    clear_cache()
    scores, counts = score_accuracy([r["solution"] for r in rows], [r["answer"] for r in rows],
                                    workers=2)
    misses = [_explain(r, s) for r, s in zip(rows, scores) if s != 1.0]
    with capsys.disabled():
        print(f"\nMATH-500 oracle: {len(rows) - len(misses)}/{len(rows)} accepted, "
              f"timeouts={counts['timeouts']}, misses={misses}")
    assert len(rows) == 500
    assert len(misses) <= 0.01 * len(rows), misses


def test_r1_answer_block_is_the_final_answer():
    from openr1_mega.rl.rewards import verify_answer

    assert verify_answer("<think>3+5+0=8 5+4+0=9</think><answer>98</answer>", "98") == 1.0
    assert verify_answer("<think>maybe 98</think><answer>97</answer>", "98") == 0.0
    assert verify_answer("<answer>12</answer> no, <answer>\\frac{1}{2}</answer>", "0.5") == 1.0
