"""Peak memory (RSS) of checkpoint conversion on a multi-GB model, relative to its size.

    python tools/bench_conversion.py [--layers 2 8] [--workdir /tmp/bench_conversion]

For each layer count:
1. write a random bf16 checkpoint with the Qwen2.5-7B shape (hidden 3584, 28 heads /
   4 KV heads, FFN 18944, vocab 152064, untied) but only that many layers (8 -> 5.9 GB),
   streamed tensor by tensor, in 2 GB shards like a hub checkpoint;
2. run, each in a fresh process that reports its own peak RSS (VmHWM):
   imports only (the fixed cost of torch + Megatron + transformers), a naive baseline that
   loads the whole checkpoint into memory, hf-to-mcore (--tp 2), and mcore-to-hf;
3. check the round trip is bit-exact (tensor by tensor) and delete the checkpoints
   (unless --keep; at most three copies of one size are on disk at a time).
Streaming shows as a peak that stays flat while the model grows. Writes
bench/results/conversion-cpu.json.
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

from openr1_mega.utils.machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
QWEN25_7B = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                 num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                 vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_theta=1_000_000.0, tie_word_embeddings=False, dtype="bfloat16")

STEPS = {
    "imports_only": "import openr1_mega.checkpoint.convert, transformers",
    "naive_load_all": ("from openr1_mega.checkpoint.safetensors_io import HFReader\n"
                       "r = HFReader({hf!r}); keep = {{n: r.get(n) for n in r.names()}}"),
    "hf_to_mcore": ("from openr1_mega.checkpoint.convert import hf_to_mcore\n"
                    "from openr1_mega.config.schema import ParallelConfig\n"
                    "hf_to_mcore({hf!r}, {mcore!r}, ParallelConfig(tp=2), progress=False)"),
    "mcore_to_hf": ("from openr1_mega.checkpoint.convert import mcore_to_hf\n"
                    "mcore_to_hf({mcore!r}, {back!r}, progress=False)"),
}
# Peak RSS = VmHWM of this process's own address space. (getrusage's ru_maxrss would also
# count the parent's RSS at fork time: Linux carries it across fork + exec.)
_MEASURE = ("import json, time\nstart = time.perf_counter()\n{body}\n"
            "hwm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
            "if l.startswith('VmHWM'))\n"
            "print(json.dumps({{'seconds': time.perf_counter() - start, 'peak_rss_bytes': hwm}}))")


def write_random_checkpoint(out: Path, layers: int) -> tuple[int, int]:
    """Random bf16 Qwen2.5-7B-shaped checkpoint; returns (bytes, largest tensor bytes)."""
    from openr1_mega.checkpoint.hf import export_plan
    from openr1_mega.checkpoint.safetensors_io import HFWriter
    from openr1_mega.models.archs import arch_config

    config = dict(QWEN25_7B, num_hidden_layers=layers)
    arch = arch_config(config)
    plan = export_plan(arch, torch.bfloat16)
    writer = HFWriter(out, plan, max_shard_bytes=2 << 30)
    gen = torch.Generator().manual_seed(0)
    for name, shape, dtype in plan:
        writer.add(name, torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=gen))
    writer.close()
    (out / "config.json").write_text(json.dumps(arch.hf_config, indent=2))
    largest = max(torch.Size(s).numel() * 2 for _, s, _ in plan)
    return writer.total_bytes, largest


def measure(step: str, **paths: str) -> dict:
    """Run one step in a fresh interpreter; its own peak RSS and wall time."""
    code = _MEASURE.format(body=STEPS[step].format(**paths))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bit_exact(a: Path, b: Path) -> bool:
    """Every tensor of HF dir `a` equals the one in `b` (read one at a time)."""
    from openr1_mega.checkpoint.safetensors_io import HFReader

    ra, rb = HFReader(a), HFReader(b)
    return sorted(ra.names()) == sorted(rb.names()) and all(
        ra.dtype(n) == rb.dtype(n) and torch.equal(ra.get(n), rb.get(n)) for n in ra.names())


def device_info() -> dict:
    model = cpu_model()
    mem = next(int(line.split()[1]) * 1024 for line in
               Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {"device": f"CPU: {model}", "cpu_count": os.cpu_count(), "ram_bytes": mem}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--workdir", default="/tmp/bench_conversion")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "conversion-cpu.json"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args(argv)
    sizes = [run_size(Path(args.workdir) / f"layers_{n}", n, args.keep) for n in args.layers]
    report = {**device_info(),
              "command": "python tools/bench_conversion.py " + " ".join(sys.argv[1:]),
              "torch": torch.__version__, "model_shape": QWEN25_7B, "sizes": sizes,
              "baseline": "naive_load_all = every tensor of the checkpoint held in memory at "
                          "once (what a non-streaming converter needs at least); imports_only "
                          "= the fixed interpreter cost included in every peak"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps([s["summary"] for s in sizes]))
    return 0 if all(s["round_trip_bit_exact"] for s in sizes) else 1


def run_size(work: Path, layers: int, keep: bool) -> dict:
    """Write, convert both ways, check and measure one model size."""
    shutil.rmtree(work, ignore_errors=True)
    paths = {"hf": str(work / "hf"), "mcore": str(work / "mcore"), "back": str(work / "hf_back")}
    try:
        start = time.perf_counter()
        size, largest = write_random_checkpoint(Path(paths["hf"]), layers)
        write_seconds = time.perf_counter() - start
        runs = {step: measure(step, **paths) for step in STEPS}
        exact = bit_exact(Path(paths["hf"]), Path(paths["back"]))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return summarise(layers, size, largest, write_seconds, runs, exact)


def summarise(layers: int, size: int, largest: int, write_seconds: float, runs: dict,
              exact: bool) -> dict:
    imports = runs["imports_only"]["peak_rss_bytes"]
    naive = runs["naive_load_all"]["peak_rss_bytes"]
    results = {}
    for step, run in runs.items():
        peak = run["peak_rss_bytes"]
        results[step] = dict(run, peak_rss_gib=round(peak / 2**30, 3),
                             peak_over_model_size=round(peak / size, 3),
                             peak_above_imports_over_model_size=round((peak - imports) / size, 3),
                             peak_over_naive=round(peak / naive, 3))
    return {
        "num_hidden_layers": layers, "checkpoint_bytes": size,
        "checkpoint_gib": round(size / 2**30, 3), "largest_tensor_bytes": largest,
        "write_seconds": round(write_seconds, 1), "results": results,
        "round_trip_bit_exact": exact,
        "summary": {"layers": layers, "checkpoint_gib": round(size / 2**30, 3),
                    **{step: {"peak_rss_gib": r["peak_rss_gib"],
                              "peak_over_model_size": r["peak_over_model_size"],
                              "seconds": round(r["seconds"], 1)}
                       for step, r in results.items()}},
    }


if __name__ == "__main__":
    sys.exit(main())
