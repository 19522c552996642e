"""Write a tiny random HF model directory (config, safetensors, tokenizer) for smoke runs.

    python tools/make_tiny_model.py --arch qwen3_moe --out outputs/tiny-qwen3-moe
"""

import argparse
import sys
from pathlib import Path

from openr1_mega.models.tiny import TINY_CONFIGS, write_tiny_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=sorted(TINY_CONFIGS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (Path(args.out) / "config.json").exists():
        print(f"{args.out} exists; keeping it")
        return 0
    print(write_tiny_model(args.out, args.arch, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
