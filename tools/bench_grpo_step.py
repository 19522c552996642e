"""Seconds of a GRPO step by phase, tokens/s and FLOP/s; optionally the same work through TRL.

    python tools/bench_grpo_step.py --steps 3 --peer trl --out bench/results/grpo_step-cpu.json
    torchrun --nproc_per_node 8 tools/bench_grpo_step.py \
        --recipe examples/recipes/qwen2.5_72b/grpo.yaml --steps 3

Ours: `openr1_mega.train.grpo` runs `--steps` steps of the recipe (default: the demo's GRPO
stage: 32 prompts x 8 completions, 48 new tokens, fp32, dapo, beta 0) with held-out
evaluation shrunk to one problem and no export, as a subprocess (`torchrun` when --nproc > 1;
in-process on every rank when this script itself runs under torchrun). Its metrics.jsonl rows
give per step: time/rollout, time/rewards (older loops score inside time/rollout: then
rewards read 0 and `rewards_in_rollout` is true), time/logprobs (advantages, packing,
old/ref log-probs), time/train, time/sync; other time/* keys count as other.
TRL (--peer trl): tools/peers/trl_grpo.py in .venv-peers (`make bench-peers`) runs GRPOTrainer
on the same HF directory, the same prompts in the same order (each step's, rendered by the
same chat template, checked token for token), group size, max tokens, temperature, top-p,
loss type, beta, epsilons, learning rate and accuracy reward, one optimizer step per rollout,
trained in micro-batches of about grpo.micro_batch_tokens padded tokens (as ours are).

Per side, over the steps after the first (a warm-up, skipped when --steps > 1):
  phase seconds and share of the step (shares sum to 1);
  generated tokens/s   completion tokens / step seconds;
  trained tokens/s     prompt + completion tokens of the step's sequences, times the optimizer
                       passes over them (num_iterations) / step seconds;
  train TFLOP/s        utils.flops.train_step_flops (attention, MLP, MoE active experts,
                       LM head; forward + backward, recompute) of the step's sequences / the
                       train phase's seconds / devices, and its fraction of the peak:
                       on CPU this machine's fp32/bf16 matmul peak (utils.peak), measured in
                       the same run (best of before and after the runs), in the recipe's dtype.
Sequence lengths: TRL's are exact (its masks); ours are each prompt's exact length plus the
step's mean completion length (the rows hold the mean), exact in the linear terms.
Prints one JSON line {ours, trl, ratio, cpu, command}; ratio.trained_tokens_per_second is
ours / TRL, ratio.step_seconds is TRL's step seconds / ours. The 1-minute load average before
and after each side is recorded: on a shared machine it says how far the two sides compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openr1_mega.utils.flops import train_step_flops
from openr1_mega.utils.machine import cpu_model

DEMO_RECIPE = ROOT / "examples" / "recipes" / "demo" / "grpo.yaml"
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
PEAK_REPEATS = 10  # best of many: on a shared CPU a single matmul often runs slowed down
PHASES = ("rollout", "rewards", "logprobs", "train", "sync", "other")
# Held-out evaluation runs outside the timed phases, but it costs wall time: keep it tiny.
BENCH_OVERRIDES = ("data.num_eval=1", "grpo.eval_samples=1", "grpo.eval_every=0",
                   "run.export_hf=false", "run.save_every=0", "run.overwrite=true")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", type=Path, default=DEMO_RECIPE)
    p.add_argument("--steps", type=int, default=3, help="GRPO steps per side (first: warm-up)")
    p.add_argument("--model", type=Path, default=None,
                   help="HF model dir; default: the recipe's model.path, else the demo's "
                        "base model (random init, its tokenizer) built under --work-dir")
    p.add_argument("--peer", choices=("none", "trl"), default="none")
    p.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    p.add_argument("--nproc", type=int, default=1, help="ranks of our side (torchrun)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="run directory (the loop also writes its final checkpoint there); "
                        "default: a temporary one, outputs/bench_grpo_step under torchrun")
    p.add_argument("--note", default="", help="free text recorded with the result")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("overrides", nargs="*", help="dotted.key=value for the recipe")
    args = p.parse_args(argv)
    if args.steps < 1 or args.nproc < 1:
        p.error(f"--steps={args.steps} and --nproc={args.nproc} must be >= 1")
    return args


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---- the model and the recipe -------------------------------------------------------------

def model_dir(args: argparse.Namespace, recipe_model_path: str, work: Path) -> Path:
    """--model, else the recipe's model.path, else the demo's base model built in `work`."""
    if args.model is not None:
        return args.model
    if recipe_model_path and Path(recipe_model_path).is_dir():
        return Path(recipe_model_path)
    if under_torchrun():
        raise ValueError("under torchrun pass --model (or a recipe whose model.path exists): "
                         "the ranks cannot build the demo model together")
    from openr1_mega.demo import build_base_model

    target = work / "model"
    return target if (target / "config.json").exists() else build_base_model(target)


def load_recipe(args: argparse.Namespace, model: Path | None = None):
    from openr1_mega.config.load import load_config
    from openr1_mega.train.grpo import GrpoRecipe

    extra = [f"model.path={model}"] if model else []
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    return load_config(args.recipe, [*args.overrides, *extra], GrpoRecipe, world_size=world)


def step_prompts(recipe, steps: int) -> list[list[dict]]:
    """The prompts of each step, as the loop picks them: {text, prompt_ids, answer}."""
    from openr1_mega.checkpoint.model_dir import load_tokenizer
    from openr1_mega.data.chat import prompt_messages
    from openr1_mega.train.policy import items_for_step, prompt_rows

    tokenizer = load_tokenizer(recipe.model.path)
    rows = prompt_rows(recipe, tokenizer).train
    data = recipe.data
    out = []
    for step in range(steps):
        items = items_for_step(rows, step, recipe.grpo.prompts_per_step, recipe.run.seed)
        out.append([{"text": tokenizer.apply_chat_template(
                        prompt_messages(str(r[data.problem_field]), data.system_prompt),
                        tokenize=False, add_generation_prompt=True),
                     "prompt_ids": r["prompt_ids"], "answer": str(r[data.answer_field])}
                    for r in items])
    return out


# ---- our side -----------------------------------------------------------------------------

def our_argv(args: argparse.Namespace, model: Path, out_dir: Path) -> list[str]:
    return ["--recipe", str(args.recipe), *args.overrides, *BENCH_OVERRIDES,
            f"model.path={model}", f"run.output_dir={out_dir}", f"grpo.steps={args.steps}"]


def run_ours(args: argparse.Namespace, model: Path, out_dir: Path) -> list[dict]:
    """Run the GRPO loop; returns its metrics rows of the training steps (rank 0)."""
    argv = our_argv(args, model, out_dir)
    if under_torchrun():
        from openr1_mega.train import grpo

        grpo.main(argv)
    else:
        launcher = [sys.executable]
        if args.nproc > 1:
            launcher = [str(Path(sys.executable).with_name("torchrun")),
                        f"--nproc_per_node={args.nproc}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        subprocess.run([*launcher, "-m", "openr1_mega.train.grpo", *argv], check=True, env=env,
                       cwd=ROOT)
    if not is_rank0():
        return []
    from openr1_mega.utils.logging import read_metrics

    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "time/train" in r]
    if len(rows) != args.steps:
        raise RuntimeError(f"{out_dir / 'metrics.jsonl'}: {len(rows)} training-step rows, "
                           f"expected {args.steps} (run.log_every must be 1)")
    return sorted(rows, key=lambda r: r["step"])


def our_phases(row: dict) -> dict[str, float]:
    """Phase seconds of one metrics row: time/<phase>; unknown time/* keys count as other,
    and a time/step total (if logged) adds what the phases leave uncovered to other."""
    seconds = dict.fromkeys(PHASES, 0.0)
    for key, value in row.items():
        name = key.removeprefix("time/")
        if key.startswith("time/") and name != "step":
            seconds[name if name in PHASES else "other"] += float(value)
    if "time/step" in row:
        seconds["other"] += max(0.0, float(row["time/step"]) - sum(seconds.values()))
    return seconds


def our_records(rows: list[dict], prompts: list[list[dict]], group_size: int,
                shared_prompt: bool = False) -> list[dict]:
    """One record per step: phases, generated and trained tokens, sequence lengths.

    Trained tokens count every completion with its prompt, as TRL trains them; the sequence
    lengths (the FLOPs) are what our model computes: with grpo.shared_prompt one row per
    prompt, the prompt once and its completions after it."""
    records = []
    for row, step_prompts_ in zip(rows, prompts, strict=True):
        count = len(step_prompts_) * group_size
        mean_completion = float(row["completion_length/mean"])
        generated = round(mean_completion * count)
        prompt_lens = [len(p["prompt_ids"]) for p in step_prompts_]
        if shared_prompt:
            seq_lens = [n + group_size * mean_completion for n in prompt_lens]
        else:
            seq_lens = [n + mean_completion for n in prompt_lens for _ in range(group_size)]
        records.append({"phases": our_phases(row), "generated_tokens": generated,
                        "trained_tokens": group_size * sum(prompt_lens) + generated,
                        "seq_lens": seq_lens})
    return records


# ---- the TRL side -------------------------------------------------------------------------

def trl_spec(recipe, prompts: list[list[dict]], steps: int) -> dict:
    """The settings tools/peers/trl_grpo.py applies; fails on what TRL cannot reproduce."""
    g, r, o = recipe.grpo, recipe.rollout, recipe.optim
    recompute = recipe.model.recompute
    if set(g.rewards) != {"accuracy"} or g.num_iterations != 1 or r.stop \
            or recompute == "selective":
        raise ValueError(f"--peer trl: needs grpo.rewards={{accuracy: w}}, grpo.num_iterations=1, "
                         f"no rollout.stop and model.recompute none or full (got rewards="
                         f"{g.rewards}, num_iterations={g.num_iterations}, stop={r.stop}, "
                         f"recompute={recompute})")
    return {"model": str(recipe.model.path), "prompts": prompts, "steps": steps,
            "prompts_per_step": g.prompts_per_step, "group_size": r.group_size,
            "max_tokens": r.max_tokens, "temperature": r.temperature, "top_p": r.top_p,
            "loss_type": g.loss_type, "beta": g.beta, "eps_low": g.eps_low,
            "eps_high": g.eps_high, "scale_rewards": g.advantage_scale,
            "mask_truncated_completions": g.mask_truncated_completions,
            "gradient_checkpointing": recompute == "full",
            "micro_batch_size": trl_micro_batch(prompts, g.prompts_per_step * r.group_size,
                                                g.micro_batch_tokens, r.max_tokens),
            "reward_params": g.reward_params.get("accuracy", {}), "lr": o.lr,
            "clip_grad": o.clip_grad, "weight_decay": o.weight_decay,
            "adam_beta1": o.adam_beta1, "adam_beta2": o.adam_beta2, "seed": recipe.run.seed}


def trl_micro_batch(prompts: list[list[dict]], completions: int, token_budget: int,
                    max_tokens: int) -> int:
    """Sequences per TRL micro-batch: the largest divisor of the step's completions whose
    padded [rows, longest prompt + max_tokens] batch fits grpo.micro_batch_tokens, as ours do."""
    width = max(len(p["prompt_ids"]) for step in prompts for p in step) + max_tokens
    rows = max(1, token_budget // width)
    return max(d for d in range(1, completions + 1) if completions % d == 0 and d <= rows)


def run_trl(args: argparse.Namespace, spec: dict, work: Path) -> dict:
    """Run the TRL peer in its own environment; returns its JSON result."""
    if not args.peer_python.exists():
        raise FileNotFoundError(f"{args.peer_python} does not exist: run `make bench-peers` "
                                "(TRL is an optional peer, installed into .venv-peers)")
    spec_path = work / "trl_spec.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run([str(args.peer_python), str(ROOT / "tools" / "peers" / "trl_grpo.py"),
                           "--spec", str(spec_path), "--out-dir", str(work / "trl")],
                          check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith('{"peer"')]
    if not lines:
        raise RuntimeError(f"tools/peers/trl_grpo.py printed no result line:\n{done.stdout}")
    return json.loads(lines[-1])


# ---- summaries ----------------------------------------------------------------------------

def summarize(records: list[dict], arch, *, recompute: str = "none", num_iterations: int = 1,
              peak_tflops: float | None = None, num_devices: int = 1) -> dict:
    """Means over the measured steps (all but the first when there are several)."""
    measured = records[1:] if len(records) > 1 else records
    totals = {p: sum(r["phases"][p] for r in measured) for p in PHASES}
    step_seconds = sum(totals.values())
    n = len(measured)
    flops = num_iterations * sum(train_step_flops(arch, r["seq_lens"], recompute)
                                 for r in measured)
    trained = num_iterations * sum(r["trained_tokens"] for r in measured)
    generated = sum(r["generated_tokens"] for r in measured)
    train_tflops = flops / max(totals["train"], 1e-12) / num_devices / 1e12
    out = {
        "steps_measured": n, "warmup_steps_skipped": len(records) - n,
        "step_seconds": step_seconds / n,
        "phase_seconds": {p: totals[p] / n for p in PHASES},
        "phase_share": {p: totals[p] / step_seconds for p in PHASES},
        "generated_tokens_per_step": generated / n, "trained_tokens_per_step": trained / n,
        "generated_tokens_per_second": generated / step_seconds,
        "trained_tokens_per_second": trained / step_seconds,
        "trained_tokens_per_second_per_device": trained / step_seconds / num_devices,
        "train_flops_per_step": flops / n, "train_tflops_per_device": train_tflops,
        "step_tflops_per_device": flops / step_seconds / num_devices / 1e12,
    }
    if peak_tflops:
        out["train_fraction_of_peak"] = train_tflops / peak_tflops
    return out


def peaks(dtype: str) -> dict:
    """This machine's matmul peak: measured fp32/bf16 on CPU, a known GPU's published one."""
    import torch

    from openr1_mega.utils.peak import machine_peak, measured_peaks

    if torch.cuda.is_available():
        peak = machine_peak(dtype)
        return {"tflops": peak.tflops, "source": peak.source}
    measured = measured_peaks("cpu", repeats=PEAK_REPEATS)
    return {"tflops": measured[f"perf/peak_{dtype}_tflops"],
            "source": f"measured cpu {dtype} matmul n=1024, best of {PEAK_REPEATS}, torch "
                      f"threads {torch.get_num_threads()}",
            "fp32_tflops": measured["perf/peak_fp32_tflops"],
            "bf16_tflops": measured["perf/peak_bf16_tflops"]}


def best_peak(before: dict, after: dict) -> dict:
    best = max(before, after, key=lambda p: p["tflops"])
    return {**best, "measured_before_after": [before["tflops"], after["tflops"]]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_grpo_step_") as tmp:
        # ranks share one run directory; the loop's final checkpoint is written there too
        work = args.work_dir or (ROOT / "outputs" / "bench_grpo_step" if under_torchrun()
                                 else Path(tmp))
        work.mkdir(parents=True, exist_ok=True)
        model = model_dir(args, load_recipe(args).model.path if not args.model else "", work)
        recipe = load_recipe(args, model)
        dtype = recipe.precision.dtype
        peak_before = peaks(dtype) if is_rank0() else None
        load = {"ours": [os.getloadavg()[0]]}
        rows = run_ours(args, model, work / "ours")
        if not is_rank0():
            return {}
        load["ours"].append(os.getloadavg()[0])
        prompts = step_prompts(recipe, args.steps)
        trl = None
        if args.peer == "trl":
            load["trl"] = [os.getloadavg()[0]]
            trl = run_trl(args, trl_spec(recipe, prompts, args.steps), work)
            load["trl"].append(os.getloadavg()[0])
        peak = best_peak(peak_before, peaks(dtype))
        result = report(args, recipe, model, rows, prompts, trl, peak)
        result["load_average_1min_before_after"] = load
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def launcher_words(world: int) -> list[str]:
    """How this script was started, for the record: the thread count, torchrun or python."""
    threads = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] \
        if "OMP_NUM_THREADS" in os.environ else []
    if under_torchrun():
        return [*threads, "torchrun", f"--nproc_per_node={world}"]
    return [*threads, Path(sys.executable).name]


def report(args, recipe, model: Path, rows: list[dict], prompts: list[list[dict]],
           trl: dict | None, peak: dict) -> dict:
    """The result: both sides' summaries, the ratios, and what was run where."""
    import torch

    from openr1_mega.models.archs import arch_config

    arch = arch_config(model)
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    common = {"arch": arch, "recompute": recipe.model.recompute, "peak_tflops": peak["tflops"]}
    g, r = recipe.grpo, recipe.rollout
    ours = summarize(our_records(rows, prompts, r.group_size, g.shared_prompt), num_devices=world,
                     num_iterations=g.num_iterations, **common)
    ours["rewards_in_rollout"] = not any("time/rewards" in row for row in rows)
    ours["torch_threads"] = torch.get_num_threads()
    result = {
        "bench": "grpo_step", "cpu": cpu_model(), "note": args.note,
        "command": shlex.join([*launcher_words(world), *sys.argv]),
        "recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_absolute()
                      and args.recipe.is_relative_to(ROOT) else args.recipe),
        "settings": {"steps": args.steps, "prompts_per_step": g.prompts_per_step,
                     "group_size": r.group_size, "max_tokens": r.max_tokens,
                     "temperature": r.temperature, "dtype": recipe.precision.dtype,
                     "loss_type": g.loss_type, "beta": g.beta, "devices": world,
                     "overrides": args.overrides},
        "peak": peak, "ours": ours,
    }
    if trl is not None:
        side = summarize(trl["steps"], **common)
        side.update(generation=trl["generation"], versions=trl["versions"],
                    torch_threads=trl["torch_threads"])
        result["trl"] = side
        result["ratio"] = {
            "trained_tokens_per_second": ours["trained_tokens_per_second"]
            / side["trained_tokens_per_second"],
            "step_seconds": side["step_seconds"] / ours["step_seconds"]}
    return result


if __name__ == "__main__":
    main()
