"""Convert checkpoints between Hugging Face safetensors and Megatron dist-checkpoint format.

    python tools/convert_checkpoint.py hf-to-mcore --hf Qwen2.5-0.5B --out ckpt/mcore --tp 2
    python tools/convert_checkpoint.py mcore-to-hf --mcore ckpt/mcore --out ckpt/hf

hf-to-mcore: HF dir (single file or sharded with an index) -> Megatron `torch_dist`
  checkpoint: QKV in Megatron's grouped layout, gate/up fused into linear_fc1, vocab padded
  to a multiple of 128 x TP, experts stacked along Megatron's expert axis. The checkpoint
  loads under any TP/PP/EP (Megatron reshards on load); --tp/--pp/--ep are validated
  against the model and set the padding. HF config and tokenizer files are kept in hf/.
mcore-to-hf: a checkpoint from hf-to-mcore or from training (openr1_mega.checkpoint.dist)
  -> HF safetensors + config + tokenizer that transformers and vLLM load directly.
Both stream tensor by tensor / layer by layer (memory stays near the largest layer), show a
progress bar, write into a hidden temporary directory renamed at the end, and refuse to
replace an existing output without --force. See openr1_mega/checkpoint/convert.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from openr1_mega.config.schema import ParallelConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron dist checkpoint")
    to_mcore.add_argument("--hf", required=True, help="HF model directory")
    to_mcore.add_argument("--out", required=True, help="output checkpoint directory")
    for flag in ("tp", "pp", "ep"):
        to_mcore.add_argument(f"--{flag}", type=int, default=1, help=f"target {flag.upper()} size")
    to_mcore.add_argument("--etp", type=int, default=None, help="expert TP size (default: tp)")
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF safetensors")
    to_hf.add_argument("--mcore", required=True, help="Megatron checkpoint directory")
    to_hf.add_argument("--out", required=True, help="output HF model directory")
    to_hf.add_argument("--max-shard-gb", type=float, default=2.0,
                       help="largest safetensors shard (also bounds memory)")
    for p in (to_mcore, to_hf):
        p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                       help="output dtype (default: keep the source dtype)")
        p.add_argument("--force", action="store_true", help="replace an existing --out")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if Path(args.out).exists() and not args.force:  # before the heavy imports
            raise FileExistsError(f"{args.out} exists; pass --force to overwrite it")
        return convert(args)
    except (FileExistsError, FileNotFoundError, ValueError, NotImplementedError) as err:
        print(f"convert_checkpoint: error: {err}", file=sys.stderr)
        return 2


def convert(args: argparse.Namespace) -> int:
    from openr1_mega.checkpoint.convert import hf_to_mcore, mcore_to_hf

    start = time.perf_counter()
    if args.command == "hf-to-mcore":
        layout = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
        out = hf_to_mcore(args.hf, args.out, layout, dtype=args.dtype, force=args.force,
                          progress=not args.no_progress)
    else:
        out = mcore_to_hf(args.mcore, args.out, dtype=args.dtype, force=args.force,
                          progress=not args.no_progress,
                          max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    print(json.dumps({"command": args.command, "out": str(out),
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
