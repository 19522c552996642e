"""One SFT and one GRPO optimizer step of a small Qwen2 on one device, checked and timed.

    python tools/gpu_step_check.py --device cuda --out step.json     # from tools/gpu_smoke.sh
    python tools/gpu_step_check.py --device cpu --size tiny          # tests/test_gpu_step_check.py

1. write a random Qwen2 (`--size small`: 8 layers, hidden 1024; `tiny`: the test model) and
   the tiny tokenizer to a temporary directory;
2. SFT with the trainer's own pieces (policy.setup, sft.sft_rows, sft.sft_forward,
   step.train_step) on padded rows of the built-in task (fp32). Check: the first step's loss
   equals transformers' token-mean NLL of the same rows with the same weights;
3. GRPO from pre-made completions (no vLLM): prompts of the built-in task, completions of
   random tokens from a fixed seed whose "sampler" log-probs come from transformers, fixed
   rewards -> ops.grpo_advantage_stats -> rl.experience.micro_batches -> the trainer's loss
   (grpo.GrpoLoss, KL to the reference model) -> train_step. Check: the trainer's
   log-probs match transformers' (sampler/abs_logprob_diff < 1e-4), also with the prompts
   shared (grpo.shared_prompt rows, forward only), and the grad norm is finite and positive;
4. each algorithm runs `--steps` steps; the JSON reports the median time of the steps after
   the first (warm-up), the peak memory (CUDA: max_memory_allocated; CPU: VmHWM), the first
   step's metrics and the checks. Exit status 1 when a check fails.
Micro-batches and rows are moved to the model's device here, whatever the loops do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"tiny": {}, "small": {"hidden_size": 1024, "num_attention_heads": 16,
                                "num_key_value_heads": 4, "intermediate_size": 2816,
                                "num_hidden_layers": 8}}
LOGPROB_TOL = 1e-4


def to_device(item, device: torch.device):
    """A copy of a dataclass of tensors (MicroBatch, Packed) with every tensor on `device`."""
    return dataclasses.replace(item, **{f.name: getattr(item, f.name).to(device)
                                        for f in dataclasses.fields(item)
                                        if isinstance(getattr(item, f.name), torch.Tensor)})


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith("VmHWM"))


def timed_steps(run_step, steps: int, device: torch.device) -> tuple[list[dict], list[float]]:
    """Call `run_step(step)` `steps` times; (metrics per step, seconds per step)."""
    metrics, seconds = [], []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        metrics.append({k: float(v) for k, v in run_step(step).items()})
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # host sync: the step's kernels have finished
        seconds.append(time.perf_counter() - start)
    return metrics, seconds


def summary(metrics: list[dict], seconds: list[float], device: torch.device) -> dict:
    timed = seconds[1:] or seconds
    return {"first_step": metrics[0], "step_seconds_median": statistics.median(timed),
            "step_seconds": seconds, "peak_memory_bytes": peak_memory_bytes(device)}


def load_hf(model_dir: Path, device: torch.device) -> torch.nn.Module:
    """The transformers model of `model_dir` in fp32 on `device`: the independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


@torch.no_grad()
def hf_logprobs(hf: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """Log-prob [1, T] of targets [1, T] at the first T positions of ids [1, S] (T <= S)."""
    device = next(hf.parameters()).device
    logits = hf(ids.to(device)).logits[:, :targets.shape[1]].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, targets.to(device)[..., None])[..., 0].cpu()


def sft_check(model_dir: Path, out_dir: Path, steps: int) -> dict:
    """SFT steps on padded rows; checks the first loss against transformers."""
    from openr1_mega.config.load import load_config
    from openr1_mega.train import policy as policy_lib
    from openr1_mega.train import sft
    from openr1_mega.train.step import train_step

    recipe = load_config(ROOT / "examples/recipes/tiny/sft.yaml", [
        f"model.path={model_dir}", f"run.output_dir={out_dir}", "sft.pack=false",
        "sft.num_train=64", "sft.rows_per_step=4", "sft.eval_fraction=0"], sft.SftRecipe)
    per_step = recipe.sft.rows_per_step
    ctx = policy_lib.setup(recipe)
    device = next(ctx.model.parameters()).device
    rows, _ = sft.sft_rows(recipe, ctx.tokenizer)
    hf = load_hf(model_dir, device)
    nll = sum(-(hf_logprobs(hf, r.input_ids, r.labels) * r.loss_mask).sum() for r in
              rows[:per_step])
    ref_loss = float(nll) / sum(r.num_tokens for r in rows[:per_step])
    del hf

    def run_step(step: int) -> dict:
        mine = [to_device(r, device) for r in rows[step * per_step:(step + 1) * per_step]]
        tokens = float(sum(r.num_tokens for r in mine))
        return train_step(ctx.ddp, ctx.optimizer, mine, sft.sft_forward(ctx, tokens, len(mine)),
                          lr=recipe.optim.lr, metric_names=("loss",),
                          shape=(1, max(r.input_ids.shape[-1] for r in mine)))

    metrics, seconds = timed_steps(run_step, steps, device)
    loss = metrics[0]["loss"]
    return {**summary(metrics, seconds, device), "transformers_loss": ref_loss,
            "checks": {"loss_matches_transformers": abs(loss - ref_loss) < LOGPROB_TOL,
                       "grad_norm_positive": 0 < metrics[0]["grad_norm"] < float("inf")}}


def premade_completions(rows: list[dict], group: int, length: int, vocab: int, seed: int):
    """`group` completions of `length` random tokens per prompt, logprobs still empty."""
    from openr1_mega.rl.types import Completion

    gen = torch.Generator().manual_seed(seed)
    return [Completion(prompt_index=p, prompt_ids=list(row["prompt_ids"]),
                       completion_ids=torch.randint(0, vocab, (length,), generator=gen).tolist(),
                       text="", finish_reason="length")
            for p, row in enumerate(rows) for _ in range(group)]


def with_sampler_logprobs(completions: list, hf: torch.nn.Module, temperature: float) -> list:
    """Fill each completion's sampler log-probs from transformers (stands in for vLLM)."""
    for c in completions:
        ids = torch.tensor([c.prompt_ids + c.completion_ids])
        logp = hf_logprobs(hf, ids, ids[:, 1:], temperature)[0]
        c.logprobs = logp[len(c.prompt_ids) - 1:].tolist()
    return completions


def grpo_check(model_dir: Path, out_dir: Path, steps: int) -> dict:
    """GRPO steps from pre-made completions; checks trainer vs transformers log-probs."""
    from openr1_mega import ops
    from openr1_mega.config.load import load_config
    from openr1_mega.rl.experience import micro_batches
    from openr1_mega.train import grpo
    from openr1_mega.train import policy as policy_lib
    from openr1_mega.train.step import train_step

    recipe = load_config(ROOT / "examples/recipes/tiny/grpo_dense.yaml", [
        f"model.path={model_dir}", f"run.output_dir={out_dir}", "parallel.tp=1",
        "grpo.num_iterations=1"], grpo.GrpoRecipe)
    g, r = recipe.grpo, recipe.rollout
    ctx = policy_lib.setup(recipe)
    device = next(ctx.model.parameters()).device
    ref_model = policy_lib.reference_model(recipe)
    prompts = policy_lib.prompt_rows(recipe, ctx.tokenizer).train[:g.prompts_per_step]
    completions = with_sampler_logprobs(premade_completions(
        prompts, r.group_size, r.max_tokens, ctx.vocab_size, recipe.run.seed),
        load_hf(model_dir, device), r.temperature)
    rewards = torch.arange(len(completions), dtype=torch.float32) % 3  # spread in every group
    stats = ops.grpo_advantage_stats(rewards, group_size=r.group_size)
    batches = micro_batches(completions, stats.advantages, g.micro_batch_tokens, ctx.pad_id,
                            device=device)
    loss = grpo.GrpoLoss.for_step(g, r, ctx.vocab_size, len(completions), batches)
    shared_gap = shared_prompt_gap(loss, ctx.ddp, micro_batches(
        completions, stats.advantages, g.micro_batch_tokens, ctx.pad_id, device=device,
        shared_prompt=True))

    def run_step(step: int) -> dict:
        ref = loss.logprobs(ref_model, batches)
        items = list(zip(batches, [None] * len(batches), ref, strict=True))
        return train_step(ctx.ddp, ctx.optimizer, items, loss.forward_step, lr=recipe.optim.lr,
                          metric_names=loss.metric_names,
                          shape=grpo._plan_shape(batches))

    metrics, seconds = timed_steps(run_step, steps, device)
    first = metrics[0]
    return {**summary(metrics, seconds, device), "completions": len(completions),
            "checks": {"logprobs_match_transformers":
                       first["sampler/abs_logprob_diff"] < LOGPROB_TOL,
                       "shared_prompt_logprobs_match_transformers": shared_gap < LOGPROB_TOL,
                       "grad_norm_positive": 0 < first["grad_norm"] < float("inf")},
            "shared_prompt_max_abs_logprob_diff": shared_gap}


def shared_prompt_gap(loss, model, batches: list) -> float:
    """Largest |trainer - transformers| log-prob over the completion tokens when each prompt
    is laid out once with its completions after it (grpo.shared_prompt; forward only)."""
    gaps = [((logp - b.sampler_logprobs).abs() * b.mask).max()
            for b, logp in zip(batches, loss.logprobs(model, batches), strict=True)]
    return float(torch.stack(gaps).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    args = parser.parse_args(argv)
    if args.device == "cpu":  # the trainers pick CUDA whenever torch sees one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    from openr1_mega.models.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "qwen2", "qwen2", **SIZES[args.size])
        report = {"device": args.device, "size": args.size, "torch": torch.__version__,
                  "sft": sft_check(model_dir, Path(tmp) / "sft", args.steps),
                  "grpo": grpo_check(model_dir, Path(tmp) / "grpo", args.steps)}
    report["ok"] = all(all(report[k]["checks"].values()) for k in ("sft", "grpo"))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
