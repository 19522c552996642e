"""GRPO on Megatron-Core with colocated vLLM rollouts and in-memory weight sync.

Each step (Shao et al. 2024, DeepSeekMath; with DAPO's clip-higher and loss options):
  1. take `prompts_per_step` prompts (order fixed by (seed, step): resumable);
  2. rank 0's vLLM engine samples G completions per prompt; rank 0 scores them with the
     recipe's rewards (weighted sum) and broadcasts completions + rewards to all ranks;
  3. group-normalised advantages (ops.grpo_advantage); each data-parallel rank takes its
     share of completions, packed into token-budgeted micro-batches;
  4. old log-probs (only when num_iterations > 1) and reference log-probs (only when
     beta > 0) by forward passes; then num_iterations optimizer steps on the policy loss
     (rl/losses.py) with global denominators (train/step.py);
  5. the updated weights stream into vLLM (rl/weight_sync.py), no disk involved;
  6. metrics to JSONL/TensorBoard; held-out accuracy every `eval_every` steps; a
     dist-checkpoint every `save_every` steps; an HF export at the end.

    torchrun --nproc_per_node 2 -m openr1_mega.train.grpo --recipe examples/recipes/...yaml
    python -m openr1_mega.train.grpo --recipe R.yaml grpo.steps=3 --resume
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from openr1_mega import ops
from openr1_mega.config.load import load_config, to_dict
from openr1_mega.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
from openr1_mega.config.train import DataConfig, GrpoConfig, OptimConfig, RolloutConfig, RunConfig
from openr1_mega.rl.experience import micro_batches
from openr1_mega.rl.losses import policy_loss
from openr1_mega.train import policy as policy_lib
from openr1_mega.train import preemption
from openr1_mega.train.evaluate import accuracy_on
from openr1_mega.train.logprobs import logits_to_logprobs
from openr1_mega.train.output_dir import prepare_output_dir
from openr1_mega.train.step import cosine_lr, scaled_loss, train_step
from openr1_mega.utils.logging import MetricsLogger


@dataclass
class GrpoRecipe:
    """A GRPO recipe: the model side (schema.py) plus the training sections (train.py)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    run: RunConfig = field(default_factory=RunConfig)


def main(argv: list[str] | None = None) -> dict:
    """Run GRPO from a recipe; returns the final metrics (rank 0)."""
    args = _parse_args(argv)
    recipe = load_config(args.recipe, args.overrides, GrpoRecipe)
    prepare_output_dir(recipe.run, args.resume)
    preemption.install()
    g, r = recipe.grpo, recipe.rollout
    ctx = policy_lib.setup(recipe)
    rows = policy_lib.prompt_rows(recipe, ctx.tokenizer)
    rewards = policy_lib.reward_set(g) if ctx.is_rank0 else None
    ref_model = policy_lib.reference_model(recipe) if g.beta > 0 else None
    start = policy_lib.resume(ctx, recipe.run) if args.resume else 0
    engine = policy_lib.start_engine(ctx, recipe)
    logger = MetricsLogger(recipe.run.output_dir, enabled=ctx.is_rank0)
    if ctx.is_rank0:
        policy_lib.write_recipe(recipe.run.output_dir, to_dict(recipe))
    last: dict = {}
    if start == 0 and rows.eval:  # the starting policy's held-out accuracy, as step 0
        logger.log(0, accuracy_on(ctx, engine, rows.eval, r, recipe))
    for step in tqdm(range(start, g.steps), desc="grpo", disable=not ctx.is_rank0,
                     initial=start, total=g.steps):
        timer = {"start": time.perf_counter()}
        prompts = policy_lib.items_for_step(rows.train, step, g.prompts_per_step,
                                              recipe.run.seed)
        completions, totals, reward_metrics = policy_lib.rollout_and_score(
            ctx, engine, rewards, prompts, r, step, recipe.run.seed)
        timer["rollout"] = time.perf_counter()

        stats = ops.grpo_advantage_stats(totals, group_size=r.group_size,
                                         scale=g.advantage_scale)
        batches = micro_batches(completions, stats.advantages, g.micro_batch_tokens, ctx.pad_id,
                                g.mask_truncated_completions, ps.get_data_parallel_rank(),
                                ps.get_data_parallel_world_size())
        denominator = _global_denominator(g, completions, batches, r.max_tokens)
        old = _forward_logprobs(ctx, ctx.model, batches, r.temperature) \
            if g.num_iterations > 1 else None
        ref = _forward_logprobs(ctx, ref_model, batches, r.temperature) if ref_model else None
        timer["logprobs"] = time.perf_counter()

        lr = cosine_lr(step, g.steps, recipe.optim)
        for _ in range(g.num_iterations):
            step_metrics = train_step(
                ctx.ddp, ctx.optimizer, list(zip(batches, old or [None] * len(batches),
                                                 ref or [None] * len(batches))),
                _grpo_forward(ctx, g, r, denominator, batches),
                seq_length=max(b.input_ids.shape[1] for b in batches), lr=lr)
        timer["train"] = time.perf_counter()

        sync = policy_lib.sync_engine(ctx, engine)
        timer["sync"] = time.perf_counter()
        last = _step_metrics(step_metrics, reward_metrics, stats, completions, timer, sync, r)
        if g.eval_every and (step + 1) % g.eval_every == 0 or step + 1 == g.steps:
            last.update(accuracy_on(ctx, engine, rows.eval, r, recipe))
        if ctx.is_rank0 and step % recipe.run.log_every == 0 or step + 1 == g.steps:
            logger.log(step + 1, last)
        if recipe.run.save_every and (step + 1) % recipe.run.save_every == 0:
            policy_lib.save(ctx, recipe.run, step + 1)
        if preemption.requested():  # collective: every rank stops after the same step
            policy_lib.save_and_exit(ctx, recipe.run, step + 1, logger)
    policy_lib.finish(ctx, recipe.run, g.steps, logger)
    return last


def _grpo_forward(ctx, g: GrpoConfig, r: RolloutConfig, denominator: float, batches: list):
    """Megatron forward-step function: policy forward, then the GRPO loss on the last stage."""
    num_mb = len(batches)
    local_tokens = max(sum(float(b.mask.sum()) for b in batches), 1.0)

    def forward_step(item, model):
        batch, old, ref = item
        output = model(batch.input_ids, batch.position_ids, None)

        def loss_func(logits):
            logp = logits_to_logprobs(logits[:, :-1], batch.targets, ctx.vocab_size,
                                      r.temperature)
            loss, metrics = policy_loss(
                logp, logp.detach() if old is None else old, batch.advantages, batch.mask,
                loss_type=g.loss_type, eps_low=g.eps_low, eps_high=g.eps_high, beta=g.beta,
                ref_logprobs=ref, max_completion_length=r.max_tokens,
                sampler_logprobs=batch.sampler_logprobs if g.tis_cap else None,
                tis_cap=g.tis_cap, denominator=denominator)
            share = batch.mask.sum() / local_tokens  # metrics as token means
            reduced = {"loss": loss.detach()}
            reduced.update({k: v * share for k, v in metrics.items()
                            if not k.startswith("ratio/m")})
            reduced["neg_logprob"] = -(logp.detach() * batch.mask).sum() / local_tokens
            # trainer vs sampler log-prob gap: ~1e-6 in fp32 when weight sync is exact
            reduced["sampler/abs_logprob_diff"] = (
                (logp.detach() - batch.sampler_logprobs).abs() * batch.mask).sum() / local_tokens
            return scaled_loss(loss, num_mb), reduced

        return output, loss_func

    return forward_step


def _forward_logprobs(ctx, model, batches, temperature) -> list[torch.Tensor]:
    """Log-probs [B, S-1] of each micro-batch without gradients (old / reference policy)."""
    out = []
    with torch.no_grad():
        for b in batches:
            logits = model(b.input_ids, b.position_ids, None)
            out.append(logits_to_logprobs(logits[:, :-1], b.targets, ctx.vocab_size,
                                          temperature))
    return out


def _global_denominator(g: GrpoConfig, completions, batches, max_tokens: int) -> float:
    """The loss divisor over the whole step (all DP ranks), per loss_type (rl/losses.py)."""
    if g.loss_type == "grpo":
        return float(len(completions))
    if g.loss_type == "dr_grpo":
        return float(len(completions) * max_tokens)
    local = sum(float(b.mask.sum()) for b in batches)
    if g.loss_type == "bnpo":
        return max(local, 1.0)
    total = torch.tensor(local, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    return max(float(total), 1.0)


def _step_metrics(step_metrics, reward_metrics, stats, completions, timer, sync, r) -> dict:
    lengths = torch.tensor([len(c.completion_ids) for c in completions], dtype=torch.float32)
    seconds = timer["sync"] - timer["start"]
    tokens = sum(len(c.prompt_ids) + len(c.completion_ids) for c in completions)
    return {
        **step_metrics, **reward_metrics,
        "completion_length/mean": float(lengths.mean()),
        "completion_length/max": float(lengths.max()),
        "completion_length/clipped_fraction": float((lengths >= r.max_tokens).float().mean()),
        "advantage/zero_std_groups": float(stats.num_zero_std_groups),
        "time/rollout": timer["rollout"] - timer["start"],
        "time/logprobs": timer["logprobs"] - timer["rollout"],
        "time/train": timer["train"] - timer["logprobs"],
        "time/sync": timer["sync"] - timer["train"],
        "sync/seconds": sync, "tokens_per_second": tokens / max(seconds, 1e-9),
    }


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="YAML recipe (examples/recipes/...)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in run.output_dir")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value recipe overrides")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
