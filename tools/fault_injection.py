"""Fault injection: SIGKILL a short CPU training job at random moments, resume it, and
check that the end result is bit-identical to an uninterrupted run of the same seed.

    python tools/fault_injection.py --job sft  --trials 20 [--ranks 1|2] [--seed S]
    python tools/fault_injection.py --job grpo --trials 20 [--ranks 1|2] [--seed S]

1. A tiny Qwen2 (openr1_mega/models/tiny.py) and a recipe from examples/recipes/tiny/
   (sft.yaml or grpo_dense.yaml) with overrides: a few steps, save_every 1, fp32, two
   kept checkpoints; GRPO gets rewards that vary within a group (nonzero gradients) and
   one optimizer step per rollout, so the logged trainer/sampler log-prob gap compares
   the sampler's weights with the trainer's (with two, it includes the first update).
2. Reference: one uninterrupted run (its wall time sets the random kill window).
3. Each trial, in a fresh output directory: launch with --resume (the first launch finds
   no checkpoint and starts fresh), SIGKILL it once, then relaunch with --resume until it
   exits 0. Even trials kill inside a checkpoint write: the tool polls checkpoints/ every
   2 ms for the hidden `.step_*.tmp-*` directory of a randomly chosen save, waits a
   random 0-20 ms and kills; the kill counts as "during a write" only if that directory
   is still there after death (the rename had not happened). Odd trials kill at a moment
   uniform over the reference's wall time (start-up, steps, saves, the HF export).
   After every kill each published checkpoint is verified against its manifest.
4. Compare with the reference: metrics.jsonl rows (every key but timings) equal, one row
   per step, and the final HF weights equal bit for bit (CPU runs are deterministic).
With --ranks 2 the job runs under torchrun (2 gloo ranks, TP=2) and one worker is killed;
the other must die too and no process of the job may survive (counted as orphans).

Prints one JSON line: trials, kills, kills_during_write, resumes_ok, corrupt_checkpoints,
mismatches (must be 0), orphans, and for GRPO the trainer/sampler log-prob gap
(`sampler/abs_logprob_diff`) of the first step after each resume from a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPES = {"sft": "examples/recipes/tiny/sft.yaml", "grpo": "examples/recipes/tiny/grpo_dense.yaml"}
REWARDS = {"rewards": {"repetition_penalty": 1.0, "soft_overlong_punishment": 1.0},
           "reward_params": {"repetition_penalty": {"ngram_size": 1},
                             "soft_overlong_punishment": {"max_completion_length": 16,
                                                          "soft_punish_cache": 12}}}
OVERRIDES = {
    "sft": {"sft": {"num_train": 40, "eval_fraction": 0.1}},
    "grpo": {"data": {"num_train": 100, "num_eval": 4}, "rollout": {"max_tokens": 16},
             "grpo": {"steps": 3, "num_iterations": 1, **REWARDS}},
}
UNTIMED = re.compile(r"^time/|/seconds$|^tokens_per_second$|^perf/|^gpu/")
"""Metrics that measure the machine (timings, FLOP/s, GPU state), left out of the comparison."""
GAP = "sampler/abs_logprob_diff"


@dataclass
class Counts:
    """What the trials found (the printed JSON line)."""

    trials: int = 0
    kills: int = 0
    kills_during_write: int = 0
    resumes_ok: int = 0
    resumed_from_checkpoint: int = 0
    corrupt_checkpoints: int = 0
    mismatches: int = 0
    orphans: int = 0
    gaps: list[float] = field(default_factory=list)


def main() -> None:
    args = _parse_args()
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix=f"fault-{args.job}-"))
    recipe = _write_recipe(work, args)
    began = time.perf_counter()
    ref_seconds = _reference(recipe, work / "reference", args)
    ref = _outcome(work / "reference")
    args.steps = max(r["step"] for r in json.loads(ref[0]))
    counts = Counts()
    for trial in range(args.trials):
        out = work / f"trial_{trial:02d}"
        _trial(recipe, out, args, rng, ref_seconds, write_kill=trial % 2 == 0, counts=counts)
        got = _outcome(out)
        _log(f"trial {trial}: {asdict(counts)}")
        if got != ref:
            counts.mismatches += 1
            _log(f"trial {trial}: MISMATCH with the reference in "
                 f"{'metrics' if got[0] != ref[0] else 'weights'} ({out} kept)")
        else:
            shutil.rmtree(out)
        counts.trials += 1
    print(json.dumps(_report(args, counts, ref, ref_seconds, time.perf_counter() - began)))


def _trial(recipe: Path, out: Path, args, rng: random.Random, ref_seconds: float,
           write_kill: bool, counts: Counts) -> None:
    """One launch killed (inside a write or at a random moment), then resumes to the end."""
    job = _launch(recipe, out, args)
    root = out / "checkpoints"
    if write_kill:
        temps = _kill_in_write(job, root, rng.randint(1, args.steps), rng, args.ranks)
    else:
        temps = _kill_after(job, root, rng.uniform(0, ref_seconds), rng, args.ranks)
    counts.orphans += _reap(job)
    if temps is None:  # the job had already finished
        _log(f"{out.name}: finished before the kill")
    else:
        counts.kills += 1
        counts.kills_during_write += any((root / name).exists() for name in temps)
        counts.corrupt_checkpoints += _corrupt(root)
    job = _launch(recipe, out, args)
    code = job.wait(timeout=args.timeout)
    counts.orphans += _reap(job)
    if code != 0:
        raise RuntimeError(f"{out}: the resumed run failed (exit {code}):\n{_tail(job)}")
    counts.resumes_ok += temps is not None
    step = _resumed_step(job) if temps is not None else 0  # else: relaunch of a finished run
    if step:
        counts.resumed_from_checkpoint += 1
        gap = _row(out, step + 1).get(GAP)
        if gap is not None:
            counts.gaps.append(float(gap))


def _kill_in_write(job, root: Path, nth: int, rng: random.Random,
                   ranks: int) -> set[str] | None:
    """Kill inside the `nth` checkpoint write; returns the temp directories seen then
    (None: the job ended first)."""
    seen: set[str] = set()
    while job.poll() is None:
        temps = {p.name for p in root.glob(".step_*.tmp-*")} if root.is_dir() else set()
        seen |= temps
        if len(seen) >= nth and temps:
            time.sleep(rng.uniform(0, 0.02))
            _kill(job, rng, ranks)
            return temps
        time.sleep(0.002)
    return None


def _kill_after(job, root: Path, seconds: float, rng: random.Random,
                ranks: int) -> set[str] | None:
    """Kill after `seconds`; returns the temp directories of writes under way then."""
    try:
        job.wait(timeout=seconds)
        return None
    except subprocess.TimeoutExpired:
        _kill(job, rng, ranks)
    return {p.name for p in root.glob(".step_*.tmp-*")} if root.is_dir() else set()


def _kill(job, rng: random.Random, ranks: int) -> None:
    """SIGKILL the job (one rank: its process group; two ranks: one random worker)."""
    if ranks == 1:
        os.killpg(job.pid, signal.SIGKILL)
        return
    workers = _session_pids(job.pid) - {job.pid}
    victim = rng.choice(sorted(workers)) if workers else job.pid
    os.kill(victim, signal.SIGKILL)


def _reap(job, grace: float = 120.0, settle: float = 15.0) -> int:
    """Wait for the launcher to end, then count (and kill) processes of its session still
    alive `settle` seconds later (helpers such as multiprocessing's resource tracker exit
    on their own once their parent is gone)."""
    try:
        job.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + settle
    while (left := _session_pids(job.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        _log(f"orphans of pid {job.pid}: {sorted(left)}")
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    return len(left)


def _session_pids(sid: int) -> set[int]:
    """Live (non-zombie) processes whose session is `sid` (the launcher's own session)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.add(int(stat.parent.name))
    return pids


def _launch(recipe: Path, out: Path, args) -> subprocess.Popen:
    module = f"openr1_mega.train.{args.job}"
    if args.ranks == 1:
        cmd = [sys.executable, "-m", module]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), "-m", module]
    cmd += ["--recipe", str(recipe), f"run.output_dir={out}", "--resume"]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "launches.log", "a+")  # noqa: SIM115 - read back by _tail/_resumed_step
    log.write(f"\n=== {' '.join(cmd)}\n")
    log.flush()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    job.log_offset = log.tell()
    job.log_path = out / "launches.log"
    return job


def _reference(recipe: Path, out: Path, args) -> float:
    start = time.perf_counter()
    job = _launch(recipe, out, args)
    if job.wait(timeout=args.timeout) != 0:
        raise RuntimeError(f"the reference run failed:\n{_tail(job)}")
    _reap(job)
    seconds = time.perf_counter() - start
    _log(f"reference: {seconds:.1f} s")
    return seconds


def _outcome(out: Path) -> tuple:
    """What must match bit for bit: metric rows without timings (wall-clock seconds,
    throughput), and the final weights."""
    from safetensors.torch import load_file

    rows = [{k: v for k, v in json.loads(line).items() if not UNTIMED.search(k)}
            for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    weights = load_file(out / "hf" / "model.safetensors")
    return (json.dumps(rows, sort_keys=True),
            {name: (str(t.dtype), tuple(t.shape), t.numpy().tobytes())
             for name, t in sorted(weights.items())})


def _corrupt(root: Path) -> int:
    """Published checkpoints that fail their manifest (must stay 0: writes are atomic)."""
    from openr1_mega.checkpoint.dist import verify

    if not root.is_dir():
        return 0
    bad = [p for p in root.glob("step_*") if verify(p)]
    for path in bad:
        _log(f"corrupt checkpoint {path}: {verify(path)[:3]}")
    return len(bad)


def _resumed_step(job) -> int:
    text = job.log_path.read_text()[job.log_offset:]
    match = re.search(r"--resume: continuing from \S+ \(step (\d+)\)", text)
    return int(match[1]) if match else 0


def _row(out: Path, step: int) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return next((r for r in rows if r["step"] == step), {})


def _write_recipe(work: Path, args) -> Path:
    """The tiny recipe with the fault-injection overrides, and the tiny model it trains."""
    from openr1_mega.models.tiny import write_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").exists():
        write_tiny_model(model, "qwen2")
    recipe = yaml.safe_load((ROOT / RECIPES[args.job]).read_text())
    for section, values in OVERRIDES[args.job].items():
        recipe.setdefault(section, {}).update(values)
    recipe["model"]["path"] = str(model)
    recipe["parallel"] = {"tp": args.ranks}
    recipe["precision"] = {"dtype": "fp32"}
    recipe["run"] = {"seed": args.seed, "save_every": 1, "keep_checkpoints": 2}
    path = work / f"{args.job}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _report(args, counts: Counts, ref: tuple, ref_seconds: float, seconds: float) -> dict:
    report = {"job": args.job, "ranks": args.ranks, "seed": args.seed,
              "trials": counts.trials, "kills": counts.kills,
              "kills_during_write": counts.kills_during_write, "resumes_ok": counts.resumes_ok,
              "resumed_from_checkpoint": counts.resumed_from_checkpoint,
              "corrupt_checkpoints": counts.corrupt_checkpoints,
              "mismatches": counts.mismatches, "orphans": counts.orphans,
              "reference_seconds": round(ref_seconds, 1), "seconds": round(seconds, 1)}
    if args.job == "grpo":
        rows = json.loads(ref[0])
        report["first_logprob_gap_after_resume"] = {
            "count": len(counts.gaps), "max": max(counts.gaps, default=None),
            "mean": sum(counts.gaps) / len(counts.gaps) if counts.gaps else None,
            "reference_max": max((r[GAP] for r in rows if GAP in r), default=None)}
    return report


def _tail(job) -> str:
    return job.log_path.read_text()[job.log_offset:][-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(message: str) -> None:
    print(f"[fault_injection] {message}", file=sys.stderr, flush=True)


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=("grpo", "sft"), required=True)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--ranks", type=int, choices=(1, 2), default=1)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kills and the run")
    parser.add_argument("--work", help="work directory (default: a fresh temp directory)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds one launch may take before the tool gives up")
    return parser.parse_args()


if __name__ == "__main__":
    main()
