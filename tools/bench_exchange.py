"""Benchmark the rollout exchange (rl/exchange.py) against the object-collective path it
replaced, on a gloo world of CPU processes.

Both paths start from the same state: each rank holds its engine's completions (engines of
one rank, prompts dealt round robin) and ends with its data-parallel rank's micro-batches
(trainer TP=`--tp`, DP = world / tp).
  objects   all_gather_object of every rank's completions, rank 0 scores the whole batch,
            broadcast_object_list of totals + metrics, advantages and micro_batches over
            the whole batch on every rank (the loop before the exchange);
  exchange  score (each rank its share, metadata table all-gathered), plan, deliver (each
            DP rank receives its own completions' tokens), build.
Rewards: accuracy (math-verify, in process; LaTeX answers, half right) + format. Paths are
interleaved rep by rep; each reports the median step seconds (slowest rank) and the bytes a
rank receives (objects: the pickled completions of the other ranks; exchange: table rows +
token ids + log-probs that arrive).

    .venv/bin/python tools/bench_exchange.py    # writes bench/results/exchange-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from openr1_mega.utils.machine import cpu_model


def _batch(args, offset: int = 0):
    """A step's prompts and completions; `offset` shifts every number in the texts, so no
    call reuses math-verify's parse caches from another."""
    from openr1_mega.rl.types import Completion

    prompts = [{"prompt": f"Simplify x_{p}.",
                "answer": f"\\frac{{{p + offset}}}{{{p + 1}}}+\\sqrt{{{p + offset}}}",
                "prompt_ids": [1 + p % 90] * (16 + p % 32)} for p in range(args.prompts)]
    completions = []
    for p in range(args.prompts):
        for j in range(args.group_size):
            n = args.tokens // 2 + (p * 37 + j * 101) % args.tokens
            answer = f"\\frac{{{p + offset + (p + j) % 2}}}{{{p + 1}}} + \\sqrt{{{p + offset}}}"
            completions.append(Completion(
                p, prompts[p]["prompt_ids"], [(p + k) % 1000 for k in range(n)],
                f"<think>We compute x = {p}/{p + 3} and simplify.</think>"
                f"<answer>\\boxed{{{answer}}}</answer>", "stop",
                [-0.01] * n))
    return prompts, completions


def _objects_path(args, prompts, engine_completions, rewards, dp_rank, dp_size):
    import torch
    import torch.distributed as dist

    from openr1_mega import ops
    from openr1_mega.rl.exchange import reward_inputs
    from openr1_mega.rl.experience import micro_batches

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, engine_completions)
    completions = sorted((c for part in gathered for c in part), key=lambda c: c.prompt_index)
    received = sum(len(pickle.dumps(part)) for r, part in enumerate(gathered)
                   if r != dist.get_rank())
    payload = [None]
    if dist.get_rank() == 0:
        totals, _, metrics = rewards(*reward_inputs(completions, prompts))
        payload = [(totals, metrics)]
    dist.broadcast_object_list(payload, src=0)
    stats = ops.grpo_advantage_stats(torch.tensor(payload[0][0], dtype=torch.float32),
                                     group_size=args.group_size)
    micro_batches(completions, stats.advantages, args.budget, 0, False, dp_rank, dp_size)
    return received


def _exchange_path(args, prompts, engine_completions, rewards, engines, dp_rank, dp_size):
    from openr1_mega.rl import exchange
    from openr1_mega.rl.experience import build_micro_batches, plan_micro_batches

    scored = exchange.score(engine_completions, prompts, engines, rewards, args.group_size)
    plan = plan_micro_batches(scored.table.lengths(), args.budget, dp_size)
    rows = exchange.deliver(scored, plan, dp_rank, engines, prompts)
    build_micro_batches(plan, rows, scored.stats.advantages, 0, False, dp_rank)
    arrived = [i for i in rows if i not in scored.held]
    tokens = sum(len(rows[i].completion_ids) for i in arrived)
    return scored.table.rows.element_size() * scored.table.rows.numel() + tokens * (8 + 4)


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from openr1_mega.rl.engine_groups import EngineGroups
    from openr1_mega.rl.rewards import RewardSet

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    engines = EngineGroups.split(1)
    mine = set(engines.prompt_indices(args.prompts))
    rewards = RewardSet.from_spec({"accuracy": 1.0, "format": 0.2},
                                  params={"accuracy": {"workers": 0}}, timeout=None)
    dp_rank, dp_size = rank // args.tp, world // args.tp
    seconds = {"objects": [], "exchange": []}
    received = {}
    for rep in range(args.reps + 1):  # the first rep warms up (math-verify's parser)
        for k, name in enumerate(("objects", "exchange")):
            prompts, completions = _batch(args, offset=(2 * rep + k) * 1000)
            held = [c for c in completions if c.prompt_index in mine]
            dist.barrier()
            start = time.perf_counter()
            if name == "objects":
                got = _objects_path(args, prompts, held, rewards, dp_rank, dp_size)
            else:
                got = _exchange_path(args, prompts, held, rewards, engines, dp_rank, dp_size)
            slowest = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if rep:
                seconds[name].append(float(slowest))
            received[name] = got
    queue.put((rank, seconds, received))
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="mean completion tokens")
    parser.add_argument("--budget", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench/results/exchange-cpu.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args.world, port, args, queue))
             for r in range(args.world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    seconds = results[0][1]
    median = {k: statistics.median(v) for k, v in seconds.items()}
    report = {
        "device": f"{cpu_model()} ({os.cpu_count()} cores visible)",
        "command": "python tools/bench_exchange.py " + " ".join(sys.argv[1:]),
        "load_average_before": load_before, "settings": vars(args) | {"out": None},
        "median_step_seconds": median, "all_step_seconds": seconds,
        "exchange_vs_objects_speedup": median["objects"] / median["exchange"],
        "bytes_received_per_rank": {k: [r[2][k] for r in results]
                                    for k in ("objects", "exchange")},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
