"""Check that Megatron reproduces transformers' logits on an HF checkpoint.

    python tools/check_conversion.py --hf path/to/hf_model [--tp 2 --pp 1 --ep 1]

1. transformers computes fp32 logits of a random batch (fixed seed) in this process;
2. the Megatron model is built for the layout in fresh processes (spawned here when the
   layout needs more than one rank; gloo on CPU, NCCL on GPU), its weights loaded from the
   HF dir (`load_hf_weights`), or with --via-mcore from a dist checkpoint written by
   `hf_to_mcore` first (`checkpoint.dist.load`, which reshards to the layout);
3. the last pipeline stage compares the logits on the real vocabulary columns.
Prints one JSON line (max_abs_diff, mean_abs_diff, layout, ...); exit status 1 when
max_abs_diff exceeds --tol.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from openr1_mega.config.schema import ParallelConfig, PrecisionConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf", required=True, help="Hugging Face model directory")
    for flag in ("tp", "pp", "ep"):
        parser.add_argument(f"--{flag}", type=int, default=1, help=f"{flag.upper()} size")
    parser.add_argument("--etp", type=int, default=None, help="expert TP size (default: tp)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--tol", type=float, default=1e-4, help="max abs diff allowed")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=37)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--via-mcore", action="store_true",
                        help="go through hf-to-mcore + dist-checkpoint load")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layout = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    world = world_size(layout)
    with tempfile.TemporaryDirectory(prefix="check_conversion_") as tmp:
        tmp = Path(tmp)
        input_ids, reference = reference_logits(args)
        torch.save({"input_ids": input_ids, "reference": reference}, tmp / "reference.pt")
        source = convert_first(args, layout, tmp) if args.via_mcore else None
        mp.start_processes(_worker, args=(world, args, layout, tmp, source, _free_port()),
                           nprocs=world, start_method="spawn")
        result = json.loads((tmp / "result.json").read_text())
    result.update(hf=args.hf, dtype=args.dtype, tolerance=args.tol, batch=args.batch,
                  seq_len=args.seq, via_mcore=args.via_mcore,
                  layout={"tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
                          "etp": layout.expert_tp, "world_size": world})
    result["ok"] = result["max_abs_diff"] <= args.tol
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def world_size(layout: ParallelConfig) -> int:
    """Fewest ranks for the layout: TP x PP x the DP that EP x expert-TP needs."""
    dense = layout.tp * layout.pp * layout.cp
    experts = layout.ep * layout.expert_tp
    dp = math.lcm(experts, layout.tp * layout.cp) // (layout.tp * layout.cp)
    return dense * dp


@torch.no_grad()
def reference_logits(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch and transformers' logits for it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=_dtype(args)).eval()
    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen)
    return input_ids, model(input_ids).logits.float()


def convert_first(args: argparse.Namespace, layout: ParallelConfig, tmp: Path) -> Path:
    """hf_to_mcore in a child process (conversion owns a one-rank process group)."""
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_convert, args=(args.hf, tmp / "mcore", layout))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"hf_to_mcore failed with exit code {proc.exitcode}")
    return tmp / "mcore"


def _convert(hf: str, out: Path, layout: ParallelConfig) -> None:
    from openr1_mega.checkpoint.convert import hf_to_mcore

    hf_to_mcore(hf, out, layout, progress=False)


def _worker(rank: int, world: int, args: argparse.Namespace, layout: ParallelConfig,
            tmp: Path, source: Path | None, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron.core import parallel_state as ps

    from openr1_mega.checkpoint import dist as dist_ckpt
    from openr1_mega.checkpoint.hf import load_hf_weights
    from openr1_mega.models.build import build_model
    from openr1_mega.models.forward import forward_logits
    from openr1_mega.parallel.init import initialize

    initialize(layout)
    model = build_model(args.hf, layout, precision=PrecisionConfig(dtype=args.dtype))
    if source is None:
        load_hf_weights(model, args.hf)
    else:
        dist_ckpt.load(model, None, source)
    model.eval()
    data = torch.load(tmp / "reference.pt")
    device = next(model.parameters()).device
    logits = forward_logits(model, data["input_ids"].to(device))
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0 \
            and ps.get_data_parallel_rank() == 0:
        diff = (logits.cpu() - data["reference"]).abs()
        (tmp / "result.json").write_text(json.dumps(
            {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item()}))


def _dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.float32 if args.dtype == "fp32" else torch.bfloat16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
