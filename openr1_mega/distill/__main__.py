"""Distillation CLI: `generate` teacher traces (resumable), then `filter` them.

    python -m openr1_mega.distill generate --teacher <hf dir> --dataset <path|hub> \\
        --output traces/ --n 4 --shard-size 64
    python -m openr1_mega.distill filter --input traces/ --output traces_kept/

Re-running `generate` with the same arguments resumes a killed run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from openr1_mega.distill.filter import filter_traces
from openr1_mega.distill.generate import (
    DEFAULT_TEMPLATE,
    EngineSettings,
    GenerateConfig,
    generate_traces,
)
from openr1_mega.eval.scoring import ScoringConfig


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample teacher traces into parquet shards")
    p.add_argument("--teacher", required=True, help="HF model directory or hub name")
    p.add_argument("--dataset", required=True, help="problems: jsonl/json/parquet or hub name")
    p.add_argument("--output", required=True, help="output directory (resumable)")
    p.add_argument("--split", default="train")
    p.add_argument("--dataset-config")
    p.add_argument("--id-field", default="id")
    p.add_argument("--problem-field", default="problem")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--prompt-template", default=DEFAULT_TEMPLATE,
                   help="user message with a {problem} placeholder")
    p.add_argument("--system-prompt")
    p.add_argument("--n", type=int, default=4, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=64, help="problems per shard")
    p.add_argument("--limit", type=int, help="first N problems only")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache on CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int)


def _filter_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("filter", help="keep verified, closed, untruncated traces")
    p.add_argument("--input", required=True, help="generate output dir, or parquet/jsonl")
    p.add_argument("--output", required=True, help="directory for kept rows + report")
    p.add_argument("--workers", type=int, default=2, help="math-verify processes")
    p.add_argument("--verify-timeout", type=float, default=5.0)


def _generate(args: argparse.Namespace) -> dict:
    config = GenerateConfig(
        teacher=args.teacher, dataset=args.dataset, output_dir=args.output, split=args.split,
        dataset_config=args.dataset_config, id_field=args.id_field,
        problem_field=args.problem_field, answer_field=args.answer_field,
        prompt_template=args.prompt_template, system_prompt=args.system_prompt, n=args.n,
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        seed=args.seed, shard_size=args.shard_size, limit=args.limit,
        engine=EngineSettings(dtype=args.dtype, kv_cache_bytes=int(args.kv_cache_gib * 2**30),
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              max_model_len=args.max_model_len))
    manifest = generate_traces(config)
    return {k: manifest[k] for k in ("num_shards", "complete", "skipped_problems")}


def _filter(args: argparse.Namespace) -> dict:
    return filter_traces(args.input, args.output,
                         ScoringConfig(workers=args.workers, timeout=args.verify_timeout))


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m openr1_mega.distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _filter_parser(sub)
    args = parser.parse_args(argv)
    summary = _generate(args) if args.command == "generate" else _filter(args)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
