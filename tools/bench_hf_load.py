"""Bytes each tensor-parallel rank reads when it loads an HF checkpoint: slices vs full tensors.

    python tools/bench_hf_load.py [--layers 2] [--tp 2] [--workdir /tmp/bench_hf_load]

1. write a random bf16 checkpoint with the Qwen2.5-7B shape and `--layers` layers
   (tools/bench_conversion.py's writer; 2 layers -> 3.1 GB);
2. start `--tp` fresh ranks under torchrun; each builds its TP shard of the model (bf16) and
   measures, in this order:
   - full: what the loader read before it took slices, i.e. every HF tensor of every
     parameter the rank holds, whole (`HFReader.get`), then sharded in memory;
   - sliced: `load_hf_weights`, which reads only the rank's slice (`HFReader.get_slice`);
   each as the tensor bytes requested (`HFReader.bytes_read`) and as the process's
   `rchar` from /proc/self/io (every byte read() returned, headers included);
3. write bench/results/hf_load_slices-cpu.json with the command and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conversion import QWEN25_7B, ROOT, device_info, write_random_checkpoint


def rchar() -> int:
    """Bytes this process has read through read()-family calls so far (/proc/self/io)."""
    return next(int(line.split()[1]) for line in Path("/proc/self/io").read_text().splitlines()
                if line.startswith("rchar:"))


def measure_rank(hf_dir: str, tp: int) -> dict:
    """(Inside a torchrun rank) full-tensor reads vs `load_hf_weights`' slices."""
    from openr1_mega.checkpoint.hf import load_hf_weights, param_index
    from openr1_mega.checkpoint.safetensors_io import HFReader
    from openr1_mega.config import ParallelConfig, PrecisionConfig
    from openr1_mega.models.archs import weight_map
    from openr1_mega.models.build import build_model, model_arch
    from openr1_mega.parallel.init import initialize

    initialize(ParallelConfig(tp=tp))
    model = build_model(hf_dir, ParallelConfig(tp=tp), precision=PrecisionConfig(dtype="bf16"))
    held = param_index(model)
    reader, start, clock = HFReader(hf_dir), rchar(), time.perf_counter()
    for rule in weight_map(model_arch(model)).rules():
        if rule.mcore in held:
            for name in rule.hf:
                reader.get(name)
    full = {"bytes_requested": reader.bytes_read, "rchar": rchar() - start,
            "read_seconds": time.perf_counter() - clock}
    start, clock = rchar(), time.perf_counter()
    requested = load_hf_weights(model, hf_dir)
    sliced = {"bytes_requested": requested, "rchar": rchar() - start,
              "load_seconds": time.perf_counter() - clock}
    return {"rank": torch.distributed.get_rank(), "full": full, "sliced": sliced,
            "sliced_over_full": round(sliced["rchar"] / full["rchar"], 4)}


def run_ranks(hf_dir: Path, tp: int, work: Path) -> list[dict]:
    """Start `tp` ranks of this script under torchrun; their reports in rank order."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(tp), __file__, "--worker", str(hf_dir), "--tp", str(tp), "--workdir", str(work)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"ranks failed:\n{done.stderr[-3000:]}")
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(tp)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/bench_hf_load")
    parser.add_argument("--out", default=str(ROOT / "bench/results/hf_load_slices-cpu.json"))
    parser.add_argument("--worker", metavar="HF_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    if args.worker:
        report = measure_rank(args.worker, args.tp)
        (work / f"rank{report['rank']}.json").write_text(json.dumps(report))
        return 0
    shutil.rmtree(work, ignore_errors=True)
    try:
        size, _ = write_random_checkpoint(work / "hf", args.layers)
        ranks = run_ranks(work / "hf", args.tp, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {**device_info(), "command": "python tools/bench_hf_load.py " + " ".join(
        sys.argv[1:]), "torch": torch.__version__, "model_shape": QWEN25_7B,
        "num_hidden_layers": args.layers, "tp": args.tp, "checkpoint_bytes": size,
        "ranks": ranks, "baseline": "full = every HF tensor of the parameters a rank holds "
        "read whole (the loader before slices); sliced = load_hf_weights now"}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps([{"rank": r["rank"], "full_gb": r["full"]["rchar"] / 1e9,
                       "sliced_gb": r["sliced"]["rchar"] / 1e9,
                       "ratio": r["sliced_over_full"]} for r in ranks]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
