"""Write a tiny random HF model directory (config, safetensors, tokenizer) for smoke runs.

    python tools/make_tiny_model.py --arch qwen3_moe --out outputs/tiny-qwen3-moe
    python tools/make_tiny_model.py --shape qwen2.5-1.5b --out outputs/qwen2.5-1.5b-random

--shape takes a published model's shape (random weights, tiny tokenizer) for benchmarks.
"""

import argparse
import sys
from pathlib import Path

from openr1_mega.models.tiny import REAL_SHAPES, TINY_CONFIGS, write_tiny_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--arch", choices=sorted(TINY_CONFIGS))
    kind.add_argument("--shape", choices=sorted(REAL_SHAPES),
                      help="a published model's shape with random weights")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (Path(args.out) / "config.json").exists():
        print(f"{args.out} exists; keeping it")
        return 0
    arch, fields = REAL_SHAPES[args.shape] if args.shape else (args.arch, {})
    print(write_tiny_model(args.out, arch, seed=args.seed, **fields))
    return 0


if __name__ == "__main__":
    sys.exit(main())
