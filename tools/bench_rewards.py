"""Benchmark the rewards that need processes: math-verify accuracy and the code sandbox.

Accuracy: score every MATH-500 gold `solution` against its `answer`, repeated `--repeat`
times (so one call holds repeat x 500 completions, about one GRPO step), in this process
(serial baseline) and through the process pool with 1 and `--workers` workers, after a
warm-up call that starts the pool. The verification cache is cleared before each timed
call. Also records the oracle acceptance (must be >= 99%).
Code: `--code-runs` trivial programs (read a number, print its double) through the code
reward with 1 and `--workers` sandboxes in parallel.

    .venv/bin/python tools/bench_rewards.py            # writes bench/results/rewards-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from openr1_mega.rl.rewards import get_reward, score_accuracy  # noqa: E402
from openr1_mega.rl.rewards.accuracy import clear_cache  # noqa: E402
from openr1_mega.rl.rewards.sandbox import detect_isolation  # noqa: E402


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _timed_accuracy(completions: list[str], golds: list[str], workers: int) -> dict:
    clear_cache()
    start = time.perf_counter()
    scores, counts = score_accuracy(completions, golds, workers=workers)
    seconds = time.perf_counter() - start
    return {"workers": workers, "completions": len(completions), "seconds": round(seconds, 3),
            "completions_per_s": round(len(completions) / seconds, 1),
            "accepted": sum(s == 1.0 for s in scores), **counts}


def bench_accuracy(data: Path, workers: int, repeat: int) -> dict:
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    completions = [r["solution"] for r in rows] * repeat
    golds = [r["answer"] for r in rows] * repeat
    oracle, _ = score_accuracy(completions[:len(rows)], golds[:len(rows)], workers=workers)
    misses = [r["id"] for r, s in zip(rows, oracle) if s != 1.0]
    runs = {"serial_in_process": _timed_accuracy(completions, golds, 0)}
    for n in sorted({1, workers}):
        score_accuracy(completions[:8], golds[:8], workers=n)  # warm-up: start the pool
        runs[f"pool_{n}_workers"] = _timed_accuracy(completions, golds, n)
    base = runs["serial_in_process"]["seconds"]
    return {"data": str(data), "oracle_accepted": len(rows) - len(misses),
            "oracle_total": len(rows), "oracle_misses": misses, "runs": runs,
            "speedup_vs_serial": {k: round(base / v["seconds"], 2) for k, v in runs.items()}}


def bench_code(workers: int, runs: int) -> dict:
    program = "```python\nprint(2 * int(input()))\n```"
    tests = [[{"input": str(i), "output": str(2 * i)}] for i in range(runs)]
    results = {}
    for n in sorted({1, workers}):
        reward = get_reward("code", workers=n)
        start = time.perf_counter()
        scores = reward([program] * runs, test_cases=tests)
        seconds = time.perf_counter() - start
        results[f"{n}_workers"] = {"runs": runs, "seconds": round(seconds, 3),
                                   "runs_per_s": round(runs / seconds, 1),
                                   "passed": sum(s == 1.0 for s in scores)}
    return {"isolation": detect_isolation(), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/math500.jsonl")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--code-runs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/rewards-cpu.json")
    args = parser.parse_args()
    result = {
        "device": f"{_cpu_name()} ({os.cpu_count()} cores visible)",
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        "python": platform.python_version(),
        "accuracy": bench_accuracy(args.data, args.workers, args.repeat),
        "code": bench_code(args.workers, args.code_runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
