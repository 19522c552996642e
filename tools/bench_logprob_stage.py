"""Benchmark the loss stage (final hidden states -> token log-probs, forward + backward):
today's logits path against the fused hidden-state path, peak memory and time.

    .venv/bin/python tools/bench_logprob_stage.py --out bench/results/logprob_stage-cpu.json

Both variants run on a real Megatron-Core GPTModel (one layer; only its output layer is used),
bf16, TP=1, from hidden states [S, B, H] (requires grad) to sum(logp * g) and its backward
into the hidden states and the output weight:
    logits   what the loops do today: logits = output_layer(hidden) [S, B, V], then
             transpose(0, 1).contiguous() (GPTModel._postprocess), logits[:, :-1] into
             train.logprobs.logits_to_logprobs (reshape, padded-vocab mask, token_logprob)
    fused    models.hidden / train.logprobs.hidden_to_logprobs: the output matmul fused with
             token_logprob in chunks of --chunk tokens, no [N, V] tensor
Each variant runs in a fresh subprocess (so one variant's freed pages cannot hide the
other's peak). Peak extra memory: the process's resident-set high-water mark during the
first run (reset through /proc/self/clear_refs, read from VmHWM; glibc serves these large
tensors with mmap, so freed memory leaves the resident set at once) above the resident set
just before it, inputs and model allocated. Time: median of --repeats further runs. The
memory model prints the bytes of one [N, V] logits tensor (what each copy costs) and the
fused path's own working set. The 1-minute load average is recorded: the CPU is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from openr1_mega.utils.machine import cpu_model

VARIANTS = ("logits", "fused")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384, help="N = batch x (seq - 1) targets")
    p.add_argument("--batch", type=int, default=4, help="sequences B (N must divide by it)")
    p.add_argument("--vocab", type=int, default=151936, help="V (Qwen's 151,936)")
    p.add_argument("--hidden", type=int, default=128, help="H; small so the matmuls fit 2 cores")
    p.add_argument("--chunk", type=int, default=1024, help="fused path: tokens per chunk")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, help="internal: run one variant, print JSON")
    p.add_argument("--out", type=Path, default=Path("bench/results/logprob_stage-cpu.json"))
    return p.parse_args(argv)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _model(args):
    """A one-layer bf16 GPTModel with a V-column untied output layer (TP=1, world of one)."""
    from openr1_mega.config import ParallelConfig, PrecisionConfig
    from openr1_mega.models.build import build_model
    from openr1_mega.parallel.init import initialize

    initialize(ParallelConfig())
    config = {"model_type": "qwen3", "hidden_size": args.hidden, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 64, "intermediate_size": 2 * args.hidden,
              "num_hidden_layers": 1, "vocab_size": args.vocab,
              "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": False}
    return build_model(config, ParallelConfig(), precision=PrecisionConfig(dtype="bf16"))


def _loss_step(args, model, variant: str):
    """One forward + backward of sum(logp * g) from the hidden states; returns the step."""
    import torch

    from openr1_mega.train.logprobs import hidden_to_logprobs, logits_to_logprobs

    seq = args.tokens // args.batch + 1
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(seq, args.batch, args.hidden, generator=g).to(torch.bfloat16)
    hidden.requires_grad_()
    targets = torch.randint(0, args.vocab, (args.batch, seq - 1), generator=g)
    grad_out = torch.rand(args.batch, seq - 1, generator=g)

    def logits_logp():
        logits, _ = model.output_layer(hidden)  # [S, B, V], as GPTModel._postprocess
        logits = logits.transpose(0, 1).contiguous()
        return logits_to_logprobs(logits[:, :-1], targets, args.vocab)

    def fused_logp():
        return hidden_to_logprobs(model, hidden, targets, args.vocab, chunk_size=args.chunk)

    logp_fn = logits_logp if variant == "logits" else fused_logp

    def step():
        torch.autograd.backward((logp_fn() * grad_out).sum())
        hidden.grad, model.output_layer.weight.grad = None, None

    return step


def run_variant(args) -> dict:
    """In this (fresh) process: peak extra memory of the first run, then the median time."""
    step = _loss_step(args, _model(args), args.variant)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak = (_rss_kib("VmHWM") - before) * 1024
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    import torch

    return {"peak_extra_bytes": peak, "first_run_seconds": first,
            "threads": torch.get_num_threads(),
            "seconds": statistics.median(times) if times else first}


def memory_model(args) -> dict:
    """Bytes of one bf16 [N, V] logits tensor and of the fused path's working set."""
    logits = args.tokens * args.vocab * 2
    chunk = min(args.chunk, args.tokens) * args.vocab * 2
    return {"logits_bytes_per_copy": logits, "logits_gib_per_copy": round(logits / 2**30, 3),
            "fused_chunk_logits_bytes": chunk,
            "fused_grad_weight_bytes": args.vocab * args.hidden * (4 + 2),  # fp32 acc + bf16
            "note": "the logits path holds up to several [N, V] tensors at once (the matmul "
                    "output, its transposed copy, the sliced reshape, grad_logits and the "
                    "gradient of the slice); the fused path never one"}


def _spawn(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
           "--batch", str(args.batch), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tokens % args.batch:
        sys.exit(f"--tokens {args.tokens} must be a multiple of --batch {args.batch}")
    if args.variant:
        print(json.dumps(run_variant(args)), flush=True)
        return {}
    model = memory_model(args)
    print(f"memory model: one bf16 [N={args.tokens}, V={args.vocab}] logits tensor = "
          f"{model['logits_gib_per_copy']} GiB; fused chunk = "
          f"{model['fused_chunk_logits_bytes'] / 2**20:.0f} MiB", flush=True)
    results = {}
    for variant in VARIANTS:
        results[variant] = _spawn(args, variant)
        r = results[variant]
        print(f"  {variant:<7} {r['seconds']:8.2f} s   peak extra "
              f"{r['peak_extra_bytes'] / 2**30:7.3f} GiB", flush=True)
    ratios = {"fused_peak_over_logits": results["fused"]["peak_extra_bytes"]
              / results["logits"]["peak_extra_bytes"],
              "fused_time_over_logits": results["fused"]["seconds"]
              / results["logits"]["seconds"],
              "logits_peak_in_logits_copies": results["logits"]["peak_extra_bytes"]
              / model["logits_bytes_per_copy"]}
    for key, value in ratios.items():
        print(f"{key:<30} {value:8.3f}")
    report = {"command": shlex.join(["python", "tools/bench_logprob_stage.py", *sys.argv[1:]]),
              "cpu": cpu_model(), "cpu_count": os.cpu_count(),
              "load_average_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "config": {k: getattr(args, k) for k in ("tokens", "batch", "vocab", "hidden",
                                                       "chunk", "repeats")},
              "dtype": "bfloat16", "memory_model": model, "results": results, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
