"""Benchmark the rewards that need processes: math-verify accuracy and the code sandbox.

Accuracy: score every MATH-500 gold `solution` against its `answer` (`--repeat` copies per
call) in the calling process (serial baseline, workers=0) and through the process pool with
1 and `--workers` workers. Every timed call runs in a fresh interpreter (this script with
`--one-call`), so that no setting inherits warm caches (sympy, math-verify, the LaTeX
parser's DFA) from another: it first warms up, untimed, on 64 other problems (MATH train
answers, which also starts the pool), then times one call. Settings are interleaved call by
call so that load from other jobs on the machine hits them alike; each reports the median
of `--reps` calls and the CPU time per completion (caller plus workers). Also records the
oracle acceptance (must be >= 99%).
Code: `--code-runs` trivial programs (read a number, print its double) through the code
reward with 1 and `--workers` sandboxes in parallel.

    .venv/bin/python tools/bench_rewards.py            # writes bench/results/rewards-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from openr1_mega.rl.rewards import get_reward, score_accuracy
from openr1_mega.rl.rewards.accuracy import _verify_with_status
from openr1_mega.rl.rewards.pool import shared_pool
from openr1_mega.rl.rewards.sandbox import detect_isolation
from openr1_mega.utils.machine import cpu_model


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cpu_seconds(workers: int) -> float:
    """CPU time used so far by this process and its pool workers."""
    total = time.process_time()
    if workers:
        for pid in shared_pool(_verify_with_status, workers).pids():
            cpu = psutil.Process(pid).cpu_times()
            total += cpu.user + cpu.system
    return total


def one_call(args: argparse.Namespace) -> dict:
    """Warm up on other problems, then time one scoring call (run in a fresh interpreter)."""
    rows, warmup = _rows(args.data), _rows(args.warmup_data)[:64]
    score_accuracy([f"\\boxed{{{r['answer']}}}" for r in warmup], [r["answer"] for r in warmup],
                   workers=args.one_call)
    completions = [r["solution"] for r in rows] * args.repeat
    golds = [r["answer"] for r in rows] * args.repeat
    cpu, start = _cpu_seconds(args.one_call), time.perf_counter()
    scores, counts = score_accuracy(completions, golds, workers=args.one_call)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds(args.one_call) - cpu
    misses = [r["id"] for r, s in zip(rows * args.repeat, scores) if s != 1.0]
    return {"seconds": seconds, "cpu_seconds": cpu, "completions": len(completions),
            "accepted": len(completions) - len(misses), "misses": sorted(set(misses)),
            **counts}


def _fresh_call(args: argparse.Namespace, workers: int) -> dict:
    command = [sys.executable, __file__, "--one-call", str(workers), "--data", str(args.data),
               "--warmup-data", str(args.warmup_data), "--repeat", str(args.repeat)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _summary(workers: int, calls: list[dict]) -> dict:
    n = calls[0]["completions"]
    wall = statistics.median(c["seconds"] for c in calls)
    return {"workers": workers, "completions": n, "median_seconds": round(wall, 3),
            "all_seconds": [round(c["seconds"], 3) for c in calls],
            "completions_per_s": round(n / wall, 1),
            "cpu_ms_per_completion": round(
                1000 * statistics.median(c["cpu_seconds"] for c in calls) / n, 3),
            "accepted": min(c["accepted"] for c in calls),
            "timeouts": max(c["timeouts"] for c in calls)}


def bench_accuracy(args: argparse.Namespace) -> dict:
    settings = {"serial_in_process": 0, "pool_1_worker": 1,
                f"pool_{args.workers}_workers": args.workers}
    calls: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.reps):
        for name, workers in settings.items():
            calls[name].append(_fresh_call(args, workers))
    runs = {name: _summary(workers, calls[name]) for name, workers in settings.items()}
    base = runs["serial_in_process"]["median_seconds"]
    oracle = calls[f"pool_{args.workers}_workers"][0]
    total = oracle["completions"] // args.repeat
    return {"data": str(args.data), "oracle_accepted": total - len(oracle["misses"]),
            "oracle_total": total, "oracle_misses": oracle["misses"], "runs": runs,
            "speedup_vs_serial": {k: round(base / v["median_seconds"], 2)
                                  for k, v in runs.items()}}


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
    parser.add_argument("--data", type=Path, default=REPO / "data/math500.jsonl")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup-data", type=Path,
                        default=REPO / "data/math_train.jsonl")
    parser.add_argument("--repeat", type=int, default=1, help="copies of MATH-500 per call")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per setting (median)")
    parser.add_argument("--code-runs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/rewards-cpu.json")
    parser.add_argument("--one-call", type=int, default=None, metavar="WORKERS",
                        help=argparse.SUPPRESS)  # internal: one timed call, JSON to stdout
    args = parser.parse_args()
    if args.one_call is not None:
        print(json.dumps(one_call(args)))
        return
    result = {
        "device": f"{cpu_model()} ({os.cpu_count()} cores visible)",
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        "python": platform.python_version(),
        "load_average_before": os.getloadavg(),
        "accuracy": bench_accuracy(args),
        "code": bench_code(args.workers, args.code_runs),
        "load_average_after": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
