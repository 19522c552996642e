"""GRPO on Megatron-Core with colocated vLLM rollouts and in-memory weight sync.

Each step (Shao et al. 2024, DeepSeekMath; with DAPO's clip-higher and loss options):
  1. take `prompts_per_step` prompts (order fixed by (seed, step): resumable);
  2. each vLLM engine group (rl/engine_groups.py) samples G completions for its share of
     the prompts; the ranks of an engine score its completions with the recipe's rewards
     (weighted sum), a per-completion metadata table is all-gathered as tensors, and every
     rank derives the whole batch's rewards metrics and group-normalised advantages
     (ops.grpo_advantage) from it (rl/exchange.py);
  3. micro-batches are planned over the whole batch's lengths (token budget, widths padded
     to what sequence/context parallelism needs; rl/experience.py); each data-parallel rank
     receives only its own completions' tokens and sampler log-probs (all_to_all) and
     builds its micro-batches on the model's device;
  4. old log-probs (only when num_iterations > 1) and reference log-probs (only when
     beta > 0) by forward-only passes through the pipeline schedule; then num_iterations
     optimizer steps on the policy loss (GrpoLoss -> rl/losses.py) with global
     denominators (train/step.py); metrics are the step's global values on every rank;
  5. the engine sleeps while the trainer runs (GPU: weights and KV cache released); its
     weights wake, the updated weights stream into vLLM (rl/weight_sync.py), no disk
     involved, then its KV cache wakes for the next generation;
  6. metrics to JSONL/TensorBoard; held-out accuracy every `eval_every` steps; a
     dist-checkpoint every `save_every` steps; an HF export at the end.

    torchrun --nproc_per_node 2 -m openr1_mega.train.grpo --recipe examples/recipes/...yaml
    python -m openr1_mega.train.grpo --recipe R.yaml grpo.steps=3 --resume
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from openr1_mega.config.load import load_config, to_dict
from openr1_mega.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
from openr1_mega.config.train import DataConfig, GrpoConfig, OptimConfig, RolloutConfig, RunConfig
from openr1_mega.models.hidden import forward_hidden
from openr1_mega.rl.losses import policy_loss
from openr1_mega.train import dry_run, preemption
from openr1_mega.train import policy as policy_lib
from openr1_mega.train.cli import parse_entry_args
from openr1_mega.train.evaluate import accuracy_on
from openr1_mega.train.guard import BadStepGuard, completion_ids
from openr1_mega.train.logprobs import hidden_to_logprobs
from openr1_mega.train.output_dir import prepare_output_dir
from openr1_mega.train.perf import StepPerf
from openr1_mega.train.step import (
    cosine_lr,
    forward_only,
    scaled_loss,
    train_step,
)
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
    """Run GRPO from a recipe; returns the final metrics (every rank holds the same)."""
    args = parse_entry_args(argv, __doc__.splitlines()[0])
    if args.dry_run:  # validate + print the plan; no process group, no model
        return dry_run.main(args.recipe, args.overrides, GrpoRecipe, args.world_size)
    recipe = load_config(args.recipe, args.overrides, GrpoRecipe)
    prepare_output_dir(recipe.run, args.resume)
    preemption.install()
    g, r = recipe.grpo, recipe.rollout
    ctx = policy_lib.setup(recipe)
    rows = policy_lib.prompt_rows(recipe, ctx.tokenizer)
    rewards = policy_lib.reward_set(g)  # every rank scores its engine's share
    ref_model = policy_lib.reference_model(recipe) if g.beta > 0 else None
    start = policy_lib.resume(ctx, recipe.run) if args.resume else 0
    engine = policy_lib.start_engine(ctx, recipe)
    logger = MetricsLogger(recipe.run.output_dir, enabled=ctx.is_rank0)
    if ctx.is_rank0:
        policy_lib.write_recipe(recipe.run.output_dir, to_dict(recipe))
    last: dict = {}
    guard = BadStepGuard(recipe.run.max_bad_steps, recipe.run.output_dir)
    perf = StepPerf.for_run(ctx, recipe)
    if start == 0 and rows.eval:  # the starting policy's held-out accuracy, as step 0
        logger.log(0, accuracy_on(ctx, engine, rows.eval, r, recipe))
    # Collectives: every rank reaches each line of this loop body (no rank-dependent skips).
    for step in tqdm(range(start, g.steps), desc="grpo", disable=not ctx.is_rank0,
                     initial=start, total=g.steps):
        timer = {"start": time.perf_counter()}
        prompts = policy_lib.items_for_step(rows.train, step, g.prompts_per_step,
                                              recipe.run.seed)
        completions = policy_lib.sample(ctx, engine, prompts, r, step,  # collective (engine)
                                        recipe.run.seed)
        policy_lib.release_engine(engine)  # sleeps until sync_engine wakes it
        timer["rollout"] = time.perf_counter()
        scored, plan, batches = policy_lib.rollout_and_score(  # collective
            ctx, rewards, prompts, completions, g, r)
        timer["rewards"] = time.perf_counter()

        loss = GrpoLoss.for_step(g, r, ctx.vocab_size, len(scored.table), batches)  # collective
        old = loss.logprobs(ctx.ddp, batches) if g.num_iterations > 1 else None  # collective
        ref = loss.logprobs(ref_model, batches) if ref_model else None  # collective
        timer["logprobs"] = time.perf_counter()

        lr = cosine_lr(step, g.steps, recipe.optim)
        items = list(zip(batches, old or [None] * len(batches), ref or [None] * len(batches)))
        for _ in range(g.num_iterations):
            step_metrics = train_step(ctx.ddp, ctx.optimizer, items, loss.forward_step,  # coll.
                                      lr=lr, metric_names=loss.metric_names,
                                      shape=_plan_shape(batches))
            guard.check(step, step_metrics, completion_ids(prompts, scored.table.entries()))
        timer["train"] = time.perf_counter()

        sync = policy_lib.sync_engine(ctx, engine)  # collective
        timer["sync"] = time.perf_counter()
        last = _log_row(step_metrics, scored, timer, sync, r)
        last.update(perf.metrics(plan.lengths * g.num_iterations,  # the rows computed
                                 timer["train"] - timer["logprobs"]))
        if g.eval_every and (step + 1) % g.eval_every == 0 or step + 1 == g.steps:
            last.update(accuracy_on(ctx, engine, rows.eval, r, recipe))  # collective
        if ctx.is_rank0 and step % recipe.run.log_every == 0 or step + 1 == g.steps:
            logger.log(step + 1, last)
        if recipe.run.save_every and (step + 1) % recipe.run.save_every == 0:
            policy_lib.save(ctx, recipe.run, step + 1)  # collective
        if preemption.requested():  # collective: every rank stops after the same step
            policy_lib.save_and_exit(ctx, recipe.run, step + 1, logger)
    perf.close()
    policy_lib.finish(ctx, recipe.run, g.steps, logger)
    return last


@dataclass
class GrpoLoss:
    """The GRPO loss of one step, as Megatron forward-step functions.

    Holds the step's global counts, so every micro-batch on every data-parallel rank
    divides by the same denominator (rl/losses.py) and weighs its metrics by its share of
    the step's completion tokens: summed over micro-batches and ranks (train/step.py) they
    give the full batch's loss, gradient and token-mean metrics.
    """

    grpo: GrpoConfig
    temperature: float
    max_tokens: int
    vocab_size: int
    denominator: float
    """The loss divisor over the whole step, per loss_type (module docstring of rl/losses)."""
    tokens: float
    """Completion tokens that get loss in the whole step (all data-parallel ranks)."""
    num_microbatches: int

    @classmethod
    def for_step(cls, g: GrpoConfig, r: RolloutConfig, vocab_size: int, num_completions: int,
                 batches: list) -> GrpoLoss:
        """The loss of a step whose batch has `num_completions` completions (all ranks) and
        this rank's `batches`. Collective: all-reduces the token count over DP ranks."""
        tokens = _global_tokens(batches)
        denominator = {"grpo": float(num_completions),
                       "dr_grpo": float(num_completions * r.max_tokens)}.get(g.loss_type, tokens)
        return cls(g, r.temperature, r.max_tokens, vocab_size, denominator, tokens, len(batches))

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics `forward_step` reports, each a share of the step's global value."""
        names = ("loss", "clip/low", "clip/high", "clip/region", "ratio/mean", "neg_logprob",
                 "sampler/abs_logprob_diff")
        return names + (("kl",) if self.grpo.beta > 0 else ())

    def forward_step(self, item: tuple, model) -> tuple:
        """Policy forward of (batch, old, ref) to the final hidden states; the loss runs on
        the last pipeline stage, fused with the output layer (no [B, S, V] logits)."""
        batch, old, ref = item
        return _forward(model, batch), functools.partial(self._loss, model, batch, old, ref)

    def logprobs(self, model, batches: list) -> list:
        """Token log-probs [C, T] of each micro-batch under `model`, without gradients
        (old / reference policy); None entries on stages other than the last."""
        def step(batch, chunk):
            return _forward(chunk, batch), \
                lambda hidden: (hidden.new_zeros(()),
                                {"logp": self._token_logprobs(chunk, hidden, batch)})

        out = forward_only(model, batches, step, _plan_shape(batches))
        return [m["logp"] for m in out] if out else [None] * len(batches)

    def _loss(self, model, batch, old, ref, hidden: torch.Tensor) -> tuple:
        g = self.grpo
        logp = self._token_logprobs(model, hidden, batch)
        old = logp.detach() if old is None else old  # the policy that sampled the batch
        loss, metrics = policy_loss(
            logp, old, batch.advantages, batch.mask,
            loss_type=g.loss_type, eps_low=g.eps_low, eps_high=g.eps_high, beta=g.beta,
            ref_logprobs=ref, max_completion_length=self.max_tokens,
            sampler_logprobs=batch.sampler_logprobs if g.tis_cap else None,
            tis_cap=g.tis_cap, denominator=self.denominator)
        share = batch.mask.sum() / self.tokens  # token means of the whole step
        reduced = {k: v * share for k, v in metrics.items()
                   if k not in ("ratio/min", "ratio/max")}  # extremes do not sum
        reduced["loss"] = loss.detach()
        reduced["neg_logprob"] = -(logp.detach() * batch.mask).sum() / self.tokens
        # trainer vs sampler log-prob gap of the sampling policy (before this batch's
        # updates): ~1e-6 in fp32 when weight sync is exact
        reduced["sampler/abs_logprob_diff"] = (
            (old - batch.sampler_logprobs).abs() * batch.mask).sum() / self.tokens
        return scaled_loss(loss, self.num_microbatches), reduced

    def _token_logprobs(self, model, hidden: torch.Tensor, batch) -> torch.Tensor:
        """log p(target) [C, T] of the completion tokens from the final hidden states, at
        the sampler's temperature."""
        return hidden_to_logprobs(model, hidden, batch.targets, self.vocab_size,
                                  self.temperature, sources=batch.sources)


def _forward(model, batch) -> torch.Tensor:
    """The policy's final hidden states for a micro-batch's rows; shared-prompt rows carry
    their own attention layout and RoPE positions (rl/experience.py)."""
    return forward_hidden(model, batch.input_ids, batch.position_ids, None,
                          rope_positions=batch.shared is not None,
                          packed_seq_params=batch.shared)


def _plan_shape(batches: list) -> tuple[int, int]:
    """(rows, width) the pipeline schedule is told: the widest micro-batch's (under PP all
    micro-batches share it, see rl/experience.py `uniform`)."""
    return max((tuple(b.input_ids.shape) for b in batches), key=lambda s: s[0] * s[1])


def _global_tokens(batches: list) -> float:
    """Completion tokens with loss in this step, summed over data-parallel ranks."""
    local = torch.zeros((), dtype=torch.float64, device=batches[0].mask.device)
    for b in batches:
        local += b.mask.sum()
    if dist.is_initialized():
        dist.all_reduce(local, group=ps.get_data_parallel_group())
    return max(float(local), 1.0)


def _log_row(step_metrics, scored, timer, sync, r) -> dict:
    """The step's metrics; lengths from the scored step's table (the whole batch)."""
    entries = scored.table.entries()
    lengths = torch.tensor([e.completion_length for e in entries], dtype=torch.float32)
    seconds = timer["sync"] - timer["start"]
    tokens = sum(e.prompt_length + e.completion_length for e in entries)
    return {
        **step_metrics, **scored.metrics,
        "completion_length/mean": float(lengths.mean()),
        "completion_length/max": float(lengths.max()),
        "completion_length/clipped_fraction": float((lengths >= r.max_tokens).float().mean()),
        "advantage/zero_std_groups": float(scored.stats.num_zero_std_groups),
        "time/rollout": timer["rollout"] - timer["start"],
        "time/rewards": timer["rewards"] - timer["rollout"],
        "time/logprobs": timer["logprobs"] - timer["rewards"],
        "time/train": timer["train"] - timer["logprobs"],
        "time/sync": timer["sync"] - timer["train"],
        "sync/seconds": sync, "tokens_per_second": tokens / max(seconds, 1e-9),
    }


if __name__ == "__main__":
    main()
