"""Benchmark the fused kernels against the pure-torch eager reference and torch.compile of it.

    .venv/bin/python tools/bench_kernels.py --device cpu --out bench/results/kernels-cpu.json

token_logprob, forward + backward of sum(logp * g) w.r.t. bf16 logits [N, V]:
    kernel    openr1_mega.ops.token_logprob(logits, targets), best SIMD level of the CPU
    inplace   the same with inplace_backward=True (grad written over the logits)
    kernel_avx2, inplace_avx2   (AVX-512 CPUs only) the same capped at AVX2
              (OPENR1_MEGA_CPU_ISA=avx2): the loops an AVX2-only CPU runs, timed on this CPU
    kernel_fresh  (CPU) the kernel with the gradient cache off (OPENR1_MEGA_GRAD_CACHE=0):
              every backward writes a fresh mapping, as the first backward of a process does
    eager     torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    compiled  torch.compile(eager)
grpo_advantage, forward, B completions in groups of G:
    kernel    openr1_mega.ops.grpo_advantage(rewards, group_size=G)
    eager     openr1_mega.ops.reference.grpo_advantage_reference (same outputs, float64)
    compiled  torch.compile(eager)
    trl       (r.view(-1, G) - mean) / (std + eps) in float32, advantages only (for context)
Time: median over --repeats runs after one warm-up; token_logprob's methods (fwd+bwd and
forward) and the memory probes are timed in turns, one run of each per round, so that the
shared machine's changing load hits them alike (their CPU seconds are recorded too).
Peak extra memory: the most memory in use during one run above what was in use just before
it (inputs allocated). On CPU it is the process's resident set: the high-water mark is reset
through /proc/self/clear_refs and VmHWM read back (exact; glibc serves these large tensors with
mmap, so freed memory leaves the resident set at once). On CUDA: max_memory_allocated. The
CPU gradient cache is emptied before each method's peak is taken, so a gradient counts in
full even where the timed runs reused the cached buffer.
"scratch" is the peak extra minus the returned bf16 grad_logits where that is a new tensor
(every method but the in-place one must allocate it).
The machine's limits (CPU, all threads): a STREAM-style copy of a float32 buffer half the size
of the logits (bytes read + written per second) and a read-only sum of it, both timed in the
same rounds, and torch.exp on float32 in L2-sized slices (exp/s: one thread, times the thread
count). The kernel is reported as a fraction of the memory bound: the bytes it must move
(forward: the logits read once; fwd+bwd: read twice, the gradient written once) at the copy
bandwidth, over its time; its forward's element rate also against torch.exp's and against its
own rate on 4 cache-resident rows (its compute ceiling, measured as torch.exp's). On CUDA the
forward's bandwidth is compared with a device-to-device copy. The JSON records the 1-minute
load average: the 2-core machine is shared, so compare the ratios of one run, not times
across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from openr1_mega import ops
from openr1_mega.ops import reference
from openr1_mega.utils.machine import cpu_model

ISA_ENV = "OPENR1_MEGA_CPU_ISA"
GRAD_CACHE_ENV = "OPENR1_MEGA_GRAD_CACHE"
KERNEL_METHODS = ("kernel", "inplace", "kernel_avx2", "inplace_avx2", "kernel_fresh")
EXP_SLICE = 1 << 16  # float32 elements per torch.exp call: 256 KiB, stays in L2
EXP_CALLS = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--n", type=int, default=2048, help="token_logprob rows N")
    p.add_argument("--vocab", type=int, default=151936, help="token_logprob vocab size V")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--completions", type=int, default=1 << 20, help="grpo_advantage B")
    p.add_argument("--group-size", type=int, default=16, help="grpo_advantage G")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    p.add_argument("--out", type=Path, default=None,
                   help="default: bench/results/kernels-<device>.json")
    return p.parse_args(argv)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device: str, setup=None) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up; setup() runs untimed."""
    setup = setup or (lambda: None)
    setup()
    fn()
    times = []
    for _ in range(repeats):
        setup()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin(timed: dict, repeats: int, device: str) -> dict:
    """Median (wall, CPU) seconds of each `name: (fn, setup)`, timed in turns after one warm-up
    each: every round runs every fn once, so a change in the machine's load hits all alike.
    CPU seconds are the process's, all threads; setup() runs untimed."""
    for fn, setup in timed.values():
        (setup or _noop)()
        fn()
    runs = {name: [] for name in timed}
    for _ in range(repeats):
        for name, (fn, setup) in timed.items():
            (setup or _noop)()
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: tuple(statistics.median(r[i] for r in rs) for i in range(2))
            for name, rs in runs.items()}


def _noop() -> None:
    pass


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn, device: str) -> int:
    """Peak memory in use during fn() above the memory in use just before it."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) * 1024


def logprob_step(fn, logits: torch.Tensor, targets: torch.Tensor, grad_out: torch.Tensor):
    """One forward + backward of sum(fn(logits, targets) * grad_out) w.r.t. the logits."""

    def step():
        logp = fn(logits, targets)
        return torch.autograd.grad(logp, logits, grad_out)

    return step


def _inplace_token_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ops.token_logprob(logits, targets, inplace_backward=True)


def eager_token_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)


def measure(name: str, step, repeats: int, device: str, setup=None) -> dict:
    seconds = median_time(step, repeats, device, setup)
    if setup:
        setup()
    peak = peak_extra_bytes(step, device)
    print(f"  {name:<11} {seconds * 1e3:10.1f} ms   peak extra {peak / 2**20:9.1f} MiB",
          flush=True)
    return {"seconds": seconds, "peak_extra_bytes": peak}


def with_env(fn, env: dict[str, str]):
    """fn() with the environment variables `env` set (forward and backward alike), e.g. the
    kernels capped at a SIMD level (OPENR1_MEGA_CPU_ISA); restored afterwards."""

    def run():
        old = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    return run


def cpu_isa() -> str:
    """The SIMD level the CPU kernels use ("unknown" for a build without the cpu_isa op)."""
    try:
        return torch.ops.openr1_mega.cpu_isa()
    except (AttributeError, RuntimeError):
        return "unknown"


def logprob_methods(args, logits: torch.Tensor, pristine: torch.Tensor) -> dict:
    """Method name -> (token_logprob function, untimed setup, environment), compiled last; on
    an AVX-512 CPU also the kernel capped at AVX2, on CPU also with the gradient cache off."""
    methods = {"kernel": (ops.token_logprob, None, {}),
               "inplace": (_inplace_token_logprob, lambda: logits.detach().copy_(pristine), {})}
    if args.device == "cpu" and cpu_isa() == "avx512":
        methods["kernel_avx2"] = (ops.token_logprob, None, {ISA_ENV: "avx2"})
        methods["inplace_avx2"] = (methods["inplace"][0], methods["inplace"][1], {ISA_ENV: "avx2"})
    if args.device == "cpu":
        methods["kernel_fresh"] = (ops.token_logprob, None, {GRAD_CACHE_ENV: "0"})
    methods["eager"] = (eager_token_logprob, None, {})
    if not args.no_compile:
        methods["compiled"] = (torch.compile(eager_token_logprob), None, {})
    return methods


def threads_rate(fn, elements: int, repeats: int) -> float:
    """Elements per second of fn() on one thread, times the thread count: a compute ceiling
    free of the barrier waits that small parallel calls suffer on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return elements / median_time(fn, repeats, "cpu") * threads
    finally:
        torch.set_num_threads(threads)


def in_cache_rate(logits: torch.Tensor, targets: torch.Tensor, env: dict[str, str],
                  repeats: int) -> float:
    """The kernel forward's elements per second on 4 cache-resident rows (threads_rate)."""
    rows, ids = logits.detach()[:4].contiguous(), targets[:4]
    fn = with_env(lambda: [ops.token_logprob(rows, ids) for _ in range(64)], env)
    return threads_rate(fn, 64 * rows.numel(), repeats)


def memory_probes(nbytes: int) -> dict:
    """STREAM-style copy and a read-only sum over a float32 buffer of nbytes (round_robin)."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    return {"copy": (lambda: dst.copy_(src), None), "read": (lambda: src.sum(), None)}


def bench_token_logprob(args) -> dict:
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=args.device).manual_seed(0)
    logits = (torch.randn(args.n, args.vocab, generator=gen, device=args.device) * 2).to(dtype)
    logits.requires_grad_()
    pristine = logits.detach().clone()  # the in-place backward overwrites the logits
    targets = torch.randint(0, args.vocab, (args.n,), generator=gen, device=args.device)
    grad_out = torch.randn(args.n, generator=gen, device=args.device)
    grad_bytes = logits.numel() * logits.element_size()
    methods = logprob_methods(args, logits, pristine)
    timed = {}
    for name, (fn, setup, env) in methods.items():
        timed[name] = (with_env(logprob_step(fn, logits, targets, grad_out), env), setup)
        if not name.startswith(("inplace", "kernel_fresh")):  # their forward is the kernel's
            forward = with_env(lambda fn=fn: fn(logits, targets), env)
            timed[f"{name}.forward"] = (torch.no_grad()(forward), None)
    if args.device == "cpu":
        timed |= memory_probes(grad_bytes // 2)
    print(f"token_logprob fwd+bwd, N={args.n} V={args.vocab} {args.dtype}: {args.repeats} "
          f"rounds of {len(timed)} timings", flush=True)
    times = round_robin(timed, args.repeats, args.device)
    results = {}
    for name, (fn, setup, env) in methods.items():
        r = results[name] = {"seconds": times[name][0], "cpu_seconds": times[name][1]}
        if f"{name}.forward" in times:
            r["forward_seconds"] = times[f"{name}.forward"][0]
        if setup:
            setup()
        ops.release_grad_cache()
        r["peak_extra_bytes"] = peak_extra_bytes(timed[name][0], args.device)
        own = r["peak_extra_bytes"] - (0 if name.startswith("inplace") else grad_bytes)
        r["scratch_bytes"] = max(own, 0)  # RSS may shrink by a few pages during a run
        if args.device == "cpu" and name in ("kernel", "kernel_avx2"):
            r["forward_in_cache_per_s"] = in_cache_rate(logits, targets, env, args.repeats)
        print(f"  {name:<11} {r['seconds'] * 1e3:9.1f} ms (CPU {r['cpu_seconds'] * 1e3:7.1f} ms)"
              f"  forward {r.get('forward_seconds', math.nan) * 1e3:8.1f} ms   peak extra "
              f"{r['peak_extra_bytes'] / 2**20:7.1f} MiB", flush=True)
    out = {"config": {"n": args.n, "vocab": args.vocab, "dtype": args.dtype,
                      "grad_logits_bytes": grad_bytes},
           "results": results, "ratios": _ratios(results)}
    if args.device == "cuda":
        out["bandwidth"] = _cuda_bandwidth(logits.detach(), results["kernel"]["forward_seconds"],
                                           args.repeats)
    else:
        out["limits"] = cpu_limits(times, grad_bytes // 2, args.repeats)
        out["fraction_of_bound"] = fraction_of_bound(results, grad_bytes, logits.numel(),
                                                     out["limits"])
    return out


def _ratios(results: dict) -> dict:
    ratios = {}
    for ours in KERNEL_METHODS:
        for name in ("eager", "compiled"):
            if ours in results and name in results:
                mine, base = results[ours], results[name]
                ratios[f"{ours}_speedup_vs_{name}"] = base["seconds"] / mine["seconds"]
                for key in ("peak_extra", "scratch"):
                    ratios[f"{ours}_{key}_vs_{name}"] = _fraction(mine[f"{key}_bytes"],
                                                                   base[f"{key}_bytes"])
                if "forward_seconds" in mine and "forward_seconds" in base:
                    ratios[f"{ours}_forward_speedup_vs_{name}"] = (base["forward_seconds"]
                                                                  / mine["forward_seconds"])
    return ratios


def _fraction(num: float, den: float) -> float | None:
    return num / den if den > 0 else None  # a peak of 0 bytes has no ratio


def cpu_limits(times: dict, nbytes: int, repeats: int) -> dict:
    """Copy and read bandwidth from the round-robin timings of memory_probes(nbytes), and
    torch.exp's float32 rate (threads_rate, L2-resident slices)."""
    chunk = torch.rand(EXP_SLICE) * -10
    out = torch.empty_like(chunk)

    def exps():
        for _ in range(EXP_CALLS):
            torch.exp(chunk, out=out)

    limits = {"copy_bytes_per_s": 2 * nbytes / times["copy"][0],
              "read_bytes_per_s": nbytes / times["read"][0],
              "exp_fp32_per_s": threads_rate(exps, EXP_SLICE * EXP_CALLS, repeats),
              "buffer_bytes": nbytes}
    print(f"  machine: copy {limits['copy_bytes_per_s'] / 1e9:.2f} GB/s, read "
          f"{limits['read_bytes_per_s'] / 1e9:.2f} GB/s, exp {limits['exp_fp32_per_s'] / 1e9:.2f} "
          "G/s (fp32)", flush=True)
    return limits


def fraction_of_bound(results: dict, nbytes: int, n_exps: int, limits: dict) -> dict:
    """Each kernel method's time against the memory bound; the forward's element rate also
    against torch.exp's (above 1: the kernel's exp outruns torch's) and its own in-cache rate."""
    bw = limits["copy_bytes_per_s"]
    out = {"forward_bytes": nbytes, "fwd_bwd_bytes": 3 * nbytes,
           "forward_bound_seconds": nbytes / bw, "fwd_bwd_bound_seconds": 3 * nbytes / bw}
    for name in KERNEL_METHODS:
        if name not in results:
            continue
        r = results[name]
        out[f"{name}_fwd_bwd"] = out["fwd_bwd_bound_seconds"] / r["seconds"]
        if "forward_seconds" in r:
            fwd = r["forward_seconds"]
            out[f"{name}_forward"] = out["forward_bound_seconds"] / fwd
            out[f"{name}_forward_bytes_per_s"] = nbytes / fwd
            out[f"{name}_forward_vs_torch_exp_rate"] = n_exps / fwd / limits["exp_fp32_per_s"]
            if "forward_in_cache_per_s" in r:
                out[f"{name}_forward_of_in_cache_rate"] = n_exps / fwd / r["forward_in_cache_per_s"]
    return out


def _cuda_bandwidth(logits: torch.Tensor, forward_seconds: float, repeats: int) -> dict:
    """Forward read bandwidth vs a device-to-device copy (read + write) of the same tensor."""
    dst = torch.empty_like(logits)
    copy_seconds = median_time(lambda: dst.copy_(logits), repeats, "cuda")
    nbytes = logits.numel() * logits.element_size()
    forward_bw, copy_bw = nbytes / forward_seconds, 2 * nbytes / copy_seconds
    return {"forward_bytes_per_s": forward_bw, "copy_bytes_per_s": copy_bw,
            "fraction_of_copy": forward_bw / copy_bw}


def bench_grpo(args) -> dict:
    gen = torch.Generator(device=args.device).manual_seed(0)
    b, g = args.completions, args.group_size
    rewards = torch.randint(0, 3, (b,), generator=gen, device=args.device).float() / 2

    def eager():
        return reference.grpo_advantage_reference(rewards, None, g, b // g)

    def trl():
        grouped = rewards.view(-1, g)
        return (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)

    methods = {"kernel": lambda: ops.grpo_advantage(rewards, group_size=g), "eager": eager}
    if not args.no_compile:
        methods["compiled"] = torch.compile(eager)
    methods["trl"] = trl
    print(f"grpo_advantage, B={b} G={g}", flush=True)
    results = {name: measure(name, fn, args.repeats, args.device)
               for name, fn in methods.items()}
    for r in results.values():
        r["scratch_bytes"] = r["peak_extra_bytes"]
    ratios = {f"speedup_vs_{n}": results[n]["seconds"] / results["kernel"]["seconds"]
              for n in results if n != "kernel"}
    return {"config": {"completions": b, "group_size": g}, "results": results, "ratios": ratios}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def print_ratios(report: dict) -> None:
    for op in ("token_logprob", "grpo_advantage"):
        for key, value in report[op]["ratios"].items():
            print(f"{op:<15} {key:<40} {'n/a' if value is None else f'{value:8.3f}'}")
    for key, value in report["token_logprob"].get("fraction_of_bound", {}).items():
        if not key.endswith(("bytes", "seconds", "per_s")):  # fractions; >1: beyond the bound
            print(f"{'of bound':<15} {key:<40} {value:8.3f}")


def _python_path() -> str:
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return exe.name


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ops.kernels_available():
        sys.exit("openr1_mega._C is not built: run `pip install --no-build-isolation -e .` first")
    out = args.out or Path(f"bench/results/kernels-{args.device}.json")
    report = {
        "command": shlex.join([_python_path(), *sys.argv]),
        "device": device_name(args.device),
        "cpu_isa": cpu_isa(),
        "load_average_1m": os.getloadavg()[0],  # other jobs on the machine skew the timings
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": "median of --repeats after a warm-up (token_logprob: in turns, one run of each "
                  "method per round); peak extra memory: VmHWM - VmRSS "
                  "(CPU) or max_memory_allocated (CUDA) above the memory in use before the run",
        "token_logprob": bench_token_logprob(args),
        "grpo_advantage": bench_grpo(args),
    }
    print_ratios(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
