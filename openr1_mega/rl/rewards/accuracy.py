"""Accuracy reward: does the completion's final answer equal the gold answer (math-verify)?

Algorithm, per completion:
  1. gold: parsed with math-verify (LaTeX, then plain expression). A bare answer string
     such as `\\frac{1}{2}` is wrapped as `$...$` first; an unparseable gold answer -> None.
  2. completion: parsed with \\boxed{} at the highest priority (option `boxed`: "all" joins
     every boxed answer of the text into one set, so hedging with several fails; "last"
     keeps only the text from the last \\boxed on), else the last "answer is ..." / LaTeX /
     plain-expression match.
  3. `math_verify.verify(gold, answer)` -> 1.0 or 0.0.
Time limit: math-verify's own timeout uses `signal.alarm`, which works only in the main
thread and cannot stop code that never returns to the interpreter. So the batch path runs
in a `TaskPool` (pool.py): inside a worker a `setitimer` alarm stops parse+verify at
`timeout` seconds, and the parent SIGKILLs and replaces a worker that is still busy at
`timeout + KILL_GRACE_S`. Both count as a timeout and score 0.0. math-verify's internal
alarms are disabled (they would reset ours).
"""

from __future__ import annotations

import hashlib
import logging
import re
import signal
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from latex2sympy2_extended import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from openr1_mega.rl.rewards.pool import shared_pool
from openr1_mega.rl.rewards.registry import register

logger = logging.getLogger(__name__)

KILL_GRACE_S = 1.0
_BOXED_MODES = ("all", "last")
_CACHE_SIZE = 8192
_WARMUP = ("\\boxed{\\frac{1}{2}}", "0.5", "all", None)  # sympy imports parts on first use
_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\boxed|\\\(|\\\[")  # unescaped $, \boxed, \(, \[


class _VerifyTimeout(BaseException):
    """Raised by our alarm; a BaseException so math-verify's `except Exception` lets it out."""


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeout is off; ours replaces it, so drop that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())


def _gold_source(gold: str) -> str:
    """A bare answer (`\\frac12`, `p - q`) becomes inline math; LaTeX text is kept as is."""
    if _MATH_DELIMITER.search(gold):
        return gold
    return f"${gold}$"


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    extracted = parse(_gold_source(gold), [LatexExtractionConfig(), ExprExtractionConfig()],
                      parsing_timeout=None)
    return tuple(extracted)


@lru_cache(maxsize=2)
def _answer_config(boxed: str) -> tuple:
    latex = LatexExtractionConfig(
        boxed_match_priority=0,
        normalization_config=NormalizationConfig(
            basic_latex=True, units=True, malformed_operators=True, nits=True, boxed=boxed),
    )
    return (latex, ExprExtractionConfig())


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _from_last_boxed(completion: str) -> str:
    """The text from the last \\boxed on: math-verify would join every boxed answer it finds."""
    start = completion.rfind("\\boxed")
    return completion if start < 0 else completion[start:]


def _answer_block(completion: str) -> str:
    """The R1 template's final answer: the content of the last <answer>...</answer> block,
    padded with spaces (math-verify's number patterns need a boundary: "<answer>98" has
    none); the whole completion when there is no such block."""
    blocks = _ANSWER_BLOCK.findall(completion)
    return f" {blocks[-1]} " if blocks else completion


def _verify_untimed(completion: str, gold: str, boxed: str) -> float | None:
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return None
    completion = _answer_block(completion)
    if boxed == "last":
        completion = _from_last_boxed(completion)
    answer = parse(completion, _answer_config(boxed), parsing_timeout=None)
    return 1.0 if verify(list(gold_parsed), answer, timeout_seconds=None) else 0.0


def _raise_timeout(signum: int, frame: Any) -> None:
    raise _VerifyTimeout()


def _verify_with_status(completion: str, gold: str, boxed: str,
                        timeout: float | None) -> tuple[float | None, str]:
    """(score, status) with status "ok" or "timeout"; the alarm needs the main thread."""
    use_alarm = bool(timeout) and threading.current_thread() is threading.main_thread()
    if not use_alarm:
        return _verify_untimed(completion, gold, boxed), "ok"
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            return _verify_untimed(completion, gold, boxed), "ok"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _VerifyTimeout:  # also when the alarm lands just before it was disarmed
        return 0.0, "timeout"
    finally:
        signal.signal(signal.SIGALRM, previous)


def _check_args(boxed: str, timeout: float | None, workers: int) -> None:
    if boxed not in _BOXED_MODES:
        raise ValueError(f"boxed must be one of {_BOXED_MODES}, got {boxed!r}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers and timeout is None:
        raise ValueError("timeout=None is only allowed with workers=0 (no process pool)")


def verify_answer(completion: str, gold: Any, *, boxed: str = "all",
                  timeout: float | None = 5.0) -> float | None:
    """Score one completion against one gold answer in this process.

    Args:
        completion: model output (any text; the final answer is extracted from it).
        gold: gold answer (`"\\frac{1}{2}"`, `"10\\%"`, or LaTeX text with \\boxed{}).
        boxed: "all" (every \\boxed{} of the text, together) or "last".
        timeout: seconds for parse+verify, enforced by SIGALRM when called from the main
            thread (use `score_accuracy(workers>=1)` for a hard limit anywhere).

    Returns:
        1.0 (equivalent), 0.0 (not, or timed out), None (gold missing or unparseable).
    """
    _check_args(boxed, timeout, 0)
    if gold is None:
        return None
    return _verify_with_status(str(completion), str(gold), boxed, timeout)[0]


_results: OrderedDict[tuple[bytes, str, str], float | None] = OrderedDict()
_results_lock = threading.Lock()


def _key(completion: str, gold: str, boxed: str) -> tuple[bytes, str, str]:
    """Cache key; the completion enters as a 16-byte digest (traces can be 100k chars)."""
    digest = hashlib.blake2b(completion.encode("utf-8", "surrogatepass"), digest_size=16)
    return digest.digest(), gold, boxed


def _cached(key: tuple[bytes, str, str]) -> tuple[bool, float | None]:
    with _results_lock:
        if key in _results:
            _results.move_to_end(key)
            return True, _results[key]
    return False, None


def _remember(key: tuple[bytes, str, str], score: float | None) -> None:
    with _results_lock:
        _results[key] = score
        while len(_results) > _CACHE_SIZE:
            _results.popitem(last=False)


def clear_cache() -> None:
    """Forget cached verification results (benchmarks use it to measure cold scoring)."""
    with _results_lock:
        _results.clear()


def score_accuracy(completions: Sequence[str], golds: Sequence[Any], *, workers: int = 2,
                   timeout: float = 5.0, boxed: str = "all"
                   ) -> tuple[list[float | None], dict[str, int]]:
    """Score a batch; `workers >= 1` uses the shared process pool with a hard time limit.

    Results of recent (completion, gold) pairs are cached, so the accuracy, cosine and
    length rewards of one step verify each completion once.

    Returns:
        (scores, counts): one score per completion (see `verify_answer`), and counts of
        "timeouts" (soft or hard limit hit) and "crashes" (worker died) in this call.
    """
    if len(completions) != len(golds):
        raise ValueError(f"got {len(completions)} completions but {len(golds)} golds")
    _check_args(boxed, timeout, workers)
    scores: list[float | None] = [None] * len(completions)
    counts = {"timeouts": 0, "crashes": 0}
    todo = []  # (index, key, completion, gold) of the pairs not in the cache
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        if gold is None:
            continue
        key = _key(str(completion), str(gold), boxed)
        hit, score = _cached(key)
        if hit:
            scores[i] = score
        else:
            todo.append((i, key, str(completion), str(gold)))
    pairs = [(completion, gold) for _, _, completion, gold in todo]
    if workers == 0:
        results = [_verify_with_status(c, g, boxed, timeout) for c, g in pairs]
    else:
        results = _pooled(pairs, workers, timeout, boxed, counts)
    for (i, key, _, _), (score, status) in zip(todo, results):
        scores[i] = score
        if status == "timeout":
            counts["timeouts"] += 1
        else:
            _remember(key, score)
    return scores, counts


def _pooled(pairs: list[tuple[str, str]], workers: int, timeout: float, boxed: str,
            counts: dict[str, int]) -> list[tuple[float | None, str]]:
    if not pairs:
        return []
    pool = shared_pool(_verify_with_status, workers, warmup=_WARMUP)
    tasks = [(completion, gold, boxed, timeout) for completion, gold in pairs]
    results = []
    for outcome in pool.map(tasks, timeout=timeout + KILL_GRACE_S):
        if outcome.status == "ok":
            results.append(outcome.value)
        elif outcome.status == "timeout":
            results.append((0.0, "timeout"))
        else:
            counts["crashes"] += 1
            logger.warning("accuracy verification failed (%s): %s", outcome.status, outcome.error)
            results.append((None, "crashed"))
    return results


class _AccuracyReward:
    """The registered accuracy reward; counts timeouts and crashes for `take_metrics`."""

    def __init__(self, gold_column: str, boxed: str, workers: int, timeout: float) -> None:
        _check_args(boxed, timeout, workers)
        self.gold_column, self.boxed = gold_column, boxed
        self.workers, self.timeout = workers, timeout
        self.counts = {"timeouts": 0, "crashes": 0}

    def __call__(self, completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        golds = gold_column_of(columns, self.gold_column)
        scores, counts = score_accuracy(completions, golds, workers=self.workers,
                                        timeout=self.timeout, boxed=self.boxed)
        for name, n in counts.items():
            self.counts[name] += n
        return scores

    def take_metrics(self) -> dict[str, float]:
        taken, self.counts = self.counts, {"timeouts": 0, "crashes": 0}
        return {name: float(n) for name, n in taken.items()}


def gold_column_of(columns: dict[str, Sequence[Any]], name: str) -> Sequence[Any]:
    """The gold-answer column, with an error naming it when the batch lacks it."""
    if name not in columns:
        raise KeyError(f"reward needs the gold answer column {name!r}; got columns "
                       f"{sorted(columns)}")
    return columns[name]


@register("accuracy")
def accuracy(gold_column: str = "answer", boxed: str = "all", workers: int = 2,
             timeout: float = 5.0) -> _AccuracyReward:
    """1.0 if the final answer equals column `gold_column` (math-verify), else 0.0.

    Args:
        gold_column: dataset field holding the gold answer.
        boxed: "all" (all \\boxed{} answers together, so hedging with several fails) or "last".
        workers: verification processes (0 = in this process, soft time limit only).
        timeout: seconds per verification; past it the completion scores 0.0.
    """
    return _AccuracyReward(gold_column, boxed, workers, timeout)
