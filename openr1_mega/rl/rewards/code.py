"""Code reward: run the completion's last ```python block on the row's test cases, sandboxed.

Algorithm, per completion: take the last fenced block tagged python/py/python3 (none ->
0.0); for each test case {"input": stdin text, "output": expected stdout} run the program
with `sandbox.run_program` and compare stdout with the expected output after stripping
trailing whitespace (of each line and of the whole text). Reward = fraction of tests passed
("fraction"), or 1.0 only if all pass ("binary", which stops at the first failure). A row
with no or malformed test cases, or a sandbox that fails to start, gives None.
Completions run in parallel on `workers` threads, each waiting on its own sandbox process
under its own dedicated uid. Every failing run's reason is logged (DEBUG; the first of each
kind at INFO) and counted in the metrics as `code/<status>`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from openr1_mega.rl.rewards.registry import register
from openr1_mega.rl.rewards.sandbox import (
    ISOLATIONS,
    UID_SLOTS,
    Limits,
    dedicated_uid,
    detect_isolation,
    run_program,
)

logger = logging.getLogger(__name__)

_CODE_BLOCK = re.compile(r"```(?:python3|python|py)[ \t]*\r?\n(.*?)```", re.DOTALL)
_SCORINGS = ("fraction", "binary")


def extract_code(completion: str) -> str | None:
    """The last ```python (or py/python3) fenced block of `completion`, or None."""
    blocks = _CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else None


def _normalised(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def outputs_match(actual: str, expected: str) -> bool:
    """Equal after stripping trailing whitespace of every line and of the whole text."""
    return _normalised(actual) == _normalised(expected)


def parse_test_cases(value: Any) -> list[dict[str, str]]:
    """The `test_cases` entry of one row: a list (or its JSON text) of {input, output}."""
    cases = json.loads(value) if isinstance(value, str) else value
    if not isinstance(cases, list):
        raise TypeError(f"test_cases must be a list of {{input, output}}, got "
                        f"{type(cases).__name__}")
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or not {"input", "output"} <= set(case):
            raise ValueError(f"test_cases[{i}] must be a dict with 'input' and 'output'")
    return [{"input": str(c["input"]), "output": str(c["output"])} for c in cases]


class _CodeReward:
    """The registered code reward; counts run outcomes for `take_metrics`."""

    def __init__(self, scoring: str, workers: int, limits: Limits, isolation: str,
                 python: str | None) -> None:
        if scoring not in _SCORINGS:
            raise ValueError(f"scoring must be one of {_SCORINGS}, got {scoring!r}")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        if not 1 <= workers <= UID_SLOTS:
            raise ValueError(f"workers must be in [1, {UID_SLOTS}], got {workers}")
        self.scoring, self.workers, self.limits = scoring, workers, limits
        self.isolation, self.python = isolation, python
        self.counts: Counter[str] = Counter()
        self.reported: set[str] = set()
        self.lock = threading.Lock()  # the worker threads record outcomes concurrently

    def __call__(self, completions: list[str], **columns: Sequence[Any]) -> list[float | None]:
        if "test_cases" not in columns:
            raise KeyError(f"code reward needs the 'test_cases' column; got {sorted(columns)}")
        jobs = list(zip(completions, columns["test_cases"]))
        if self.isolation == "auto":  # probe now, not while holding a uid slot
            self.isolation = detect_isolation()
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda job: self._score(*job), jobs))

    def _score(self, completion: str, test_cases: Any) -> float | None:
        if test_cases is None:
            return None
        try:
            tests = parse_test_cases(test_cases)
        except (TypeError, ValueError) as exc:
            self._record("invalid_test_cases", f"{type(exc).__name__}: {exc}")
            return None
        if not tests:
            return None
        code = extract_code(completion)
        if code is None:
            self._record("no_code", "no ```python block in the completion")
            return 0.0
        passed = 0
        with dedicated_uid() as uid:
            for test in tests:
                status = self._run(code, test, uid)
                if status == "sandbox_error":
                    return None
                passed += status == "passed"
                if status != "passed" and self.scoring == "binary":
                    break
        if self.scoring == "binary":
            return float(passed == len(tests))
        return passed / len(tests)

    def _run(self, code: str, test: dict[str, str], uid: int | None) -> str:
        result = run_program(code, test["input"], self.limits, self.isolation, uid, self.python)
        if result.status == "ok":
            status = "passed" if outputs_match(result.stdout, test["output"]) else "wrong_answer"
        else:
            status = result.status
        if status == "passed":
            with self.lock:
                self.counts["passed"] += 1
        else:
            tail = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.exit_code}"]
            self._record(status, f"{tail[0][:300]} after {result.seconds:.2f}s")
        return status

    def _record(self, status: str, detail: str) -> None:
        with self.lock:
            self.counts[status] += 1
            first = status not in self.reported
            self.reported.add(status)
        logger.debug("code reward: %s (%s)", status, detail)
        if first:
            level = logging.WARNING if status == "sandbox_error" else logging.INFO
            logger.log(level, "code reward: first %s: %s (later ones are logged at DEBUG)",
                       status, detail)

    def take_metrics(self) -> dict[str, float]:
        with self.lock:
            taken, self.counts = self.counts, Counter()
        return {name: float(n) for name, n in sorted(taken.items())}


@register("code")
def code(scoring: str = "fraction", workers: int = 2, wall_seconds: float = 4.0,
         cpu_seconds: int = 2, memory_mb: int = 512, max_processes: int = 16,
         max_output_bytes: int = 1 << 20, max_file_mb: int = 16, isolation: str = "auto",
         python: str | None = None) -> _CodeReward:
    """Fraction (or all-or-nothing) of the row's `test_cases` the last python block passes.

    Args:
        scoring: "fraction" or "binary".
        workers: completions run at once (each in its own sandbox).
        wall_seconds, cpu_seconds, memory_mb, max_processes, max_output_bytes, max_file_mb:
            per-test limits (see `sandbox.Limits`).
        isolation: "auto", "namespaces" or "rlimits" (see sandbox.py).
        python: interpreter for the programs (default: this one).
    """
    limits = Limits(wall_seconds=wall_seconds, cpu_seconds=cpu_seconds, memory_mb=memory_mb,
                    max_processes=max_processes, max_output_bytes=max_output_bytes,
                    max_file_mb=max_file_mb)
    return _CodeReward(scoring, workers, limits, isolation, python)
