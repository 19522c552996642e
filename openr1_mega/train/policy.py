"""The pieces a training loop assembles around its policy: model, optimizer, engine, data.

Kept out of the loops so grpo.py and sft.py read top to bottom. Every function here is
one phase of set-up or one collective exchange, named for what it does.
"""

from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from openr1_mega.checkpoint.hf import load_hf_weights, save_hf
from openr1_mega.checkpoint.model_dir import load_tokenizer
from openr1_mega.data.prompts import load_rows, tokenize_prompts
from openr1_mega.models.build import build_model
from openr1_mega.parallel.init import initialize
from openr1_mega.rl import exchange
from openr1_mega.rl.engine_groups import EngineGroups
from openr1_mega.rl.exchange import ScoredRollout
from openr1_mega.rl.experience import (
    MicroBatchPlan,
    build_micro_batches,
    plan_micro_batches,
    training_rows,
)
from openr1_mega.rl.rollout import EngineConfig, RolloutEngine
from openr1_mega.rl.types import Completion, SamplingConfig
from openr1_mega.train.step import (
    build_optimizer,
    default_device,
    sequence_multiple,
    wrap_ddp,
)


@dataclass
class Context:
    """What a loop holds for its whole run."""

    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: object
    tokenizer: object
    vocab_size: int
    pad_id: int
    is_rank0: bool
    model_dir: Path
    device: torch.device
    """Where the model lives: every tensor handed to it, the loss or a collective goes here."""
    engines: EngineGroups
    """This rank's vLLM engine among the world's engines of rollout.tp ranks (one rank per
    engine for recipes without a `rollout:` section)."""


@dataclass
class PromptRows:
    train: list[dict]
    eval: list[dict]


def setup(recipe) -> Context:
    """Process groups, tokenizer, the policy (HF weights loaded), DDP and optimizer."""
    model_dir = Path(recipe.model.path)
    tokenizer = load_tokenizer(model_dir)  # checks the directory first: fails before any group
    initialize(recipe.parallel, seed=recipe.run.seed)
    model = _initial_policy(recipe)
    ddp = wrap_ddp(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engines = EngineGroups.split(recipe.rollout.tp if hasattr(recipe, "rollout") else 1)
    return Context(model=model, ddp=ddp, optimizer=build_optimizer(ddp, recipe.optim),
                   tokenizer=tokenizer, vocab_size=_hf_vocab_size(model_dir), pad_id=pad,
                   is_rank0=dist.get_rank() == 0, model_dir=model_dir, device=default_device(),
                   engines=engines)


def reference_model(recipe) -> torch.nn.Module:
    """A frozen copy of the initial policy (for the KL term)."""
    return _initial_policy(recipe).eval().requires_grad_(False)


def _initial_policy(recipe) -> torch.nn.Module:
    """This rank's Megatron model for the recipe, with the HF weights of model.path loaded."""
    model = build_model(Path(recipe.model.path), recipe.parallel, precision=recipe.precision,
                        model=recipe.model)
    load_hf_weights(model, Path(recipe.model.path))
    return model


def prompt_rows(recipe, tokenizer) -> PromptRows:
    """Train and held-out prompts, tokenised with the chat template."""
    data, seed = recipe.data, recipe.run.seed
    fields = (data.problem_field, data.answer_field)
    checks = {"required": fields, "on_bad_row": data.on_bad_row}
    train = load_rows(data.source, "train", data.num_train, seed, **checks)
    if data.eval_source is not None:
        held_out = load_rows(data.eval_source, "test", data.num_eval, seed, **checks)
    elif data.source.startswith("task:"):
        held_out = load_rows(data.source, "test", data.num_eval, seed, **checks)
    else:
        held_out = []
    train, _ = tokenize_prompts(train, tokenizer, data.problem_field, data.system_prompt,
                                data.max_prompt_tokens)
    held_out, _ = tokenize_prompts(held_out, tokenizer, data.problem_field, data.system_prompt,
                                   data.max_prompt_tokens)
    if not train:
        raise ValueError(f"data.source={data.source!r}: no prompt fits "
                         f"data.max_prompt_tokens={data.max_prompt_tokens}")
    return PromptRows(train, held_out)


def items_for_step(rows: list, step: int, count: int, seed: int) -> list:
    """The items (prompts, packed rows) of `step`: an epoch-wise shuffle fixed by
    (seed, epoch), so a resumed run sees exactly what the uninterrupted run saw."""
    out = []
    for k in range(step * count, (step + 1) * count):
        epoch, offset = divmod(k, len(rows))
        out.append(rows[_epoch_order(len(rows), seed, epoch)[offset]])
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffle of epoch `epoch`, computed once per epoch rather than once per item
    (a shuffle of the whole dataset per item made each step's host work grow with it)."""
    order = list(range(size))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)


def reward_set(grpo):
    from openr1_mega.rl.rewards import RewardSet

    return RewardSet.from_spec(grpo.rewards, params=grpo.reward_params,
                               timeout=grpo.reward_timeout)


def start_engine(ctx: Context, recipe) -> RolloutEngine:
    """This rank's share of its engine (rollout.tp ranks, vLLM's external launcher under
    torchrun), started from the model directory, then synced with the policy (which
    differs from the directory after a resume). Collective over the world."""
    r = recipe.rollout
    engine = RolloutEngine(ctx.model_dir, EngineConfig(
        dtype=r.dtype, kv_cache_bytes=r.kv_cache_bytes,
        gpu_memory_utilization=r.gpu_memory_utilization, seed=recipe.run.seed,
        external_launcher=dist.get_world_size() > 1, tensor_parallel_size=r.tp,
        enable_expert_parallel=r.ep > 1, enforce_eager=r.enforce_eager,
        max_model_len=r.max_model_len))
    sync_engine(ctx, engine)
    return engine


def release_engine(engine: RolloutEngine) -> None:
    """After the rollout: the engine sleeps (weights and KV cache released) while the
    trainer runs; sync_engine wakes it."""
    engine.sleep()


def sync_engine(ctx: Context, engine: RolloutEngine) -> float:
    """Wake the engine's weights, stream the policy's full weights into every rank's engine
    (each engine rank loads its own shard), then wake the KV cache for generation; returns
    seconds. Weights before KV cache: the sync's buckets never meet a resident KV cache
    (the wake-up OOM). Collective."""
    from openr1_mega.rl.sync_source import iter_hf_tensors_everywhere
    from openr1_mega.rl.weight_sync import sync_weights

    start = time.perf_counter()
    engine.wake_weights()
    sync_weights(engine, iter_hf_tensors_everywhere(ctx.model))
    engine.wake_kv_cache()
    return time.perf_counter() - start


def sampling(r, seed: int) -> SamplingConfig:
    """The rollout sampling of a recipe's `rollout:` section (G completions per prompt)."""
    return SamplingConfig(n=r.group_size, temperature=r.temperature, top_p=r.top_p,
                          max_tokens=r.max_tokens, stop=tuple(r.stop), seed=seed)


def sample(ctx: Context, engine, prompts: list[dict], r, step: int, seed: int
           ) -> list[Completion]:
    """This rank's engine samples G completions for each of its engine's prompts (every rank
    of an engine receives the same list, grouped by prompt). Collective inside the engine."""
    mine = ctx.engines.prompt_indices(len(prompts))
    return engine.generate([prompts[i]["prompt_ids"] for i in mine], sampling(r, seed),
                           step=step, indices=mine)


def rollout_and_score(ctx: Context, rewards, prompts: list[dict], completions: list[Completion],
                      g, r) -> tuple[ScoredRollout, MicroBatchPlan, list]:
    """Score this engine's completions where they are, then hand this data-parallel rank its
    micro-batches (rl/exchange.py: tensors only, each DP rank receives its own share).

    Returns (the scored step: metadata table of the whole batch, advantage stats, reward
    metrics with a `reward/` prefix; the micro-batch plan of the whole batch; this rank's
    micro-batches). Collective.
    """
    scored = exchange.score(completions, prompts, ctx.engines, rewards, r.group_size,
                            g.advantage_scale, device=ctx.device)
    scored.metrics = {f"reward/{k}": v for k, v in scored.metrics.items()}
    dp_rank, multiple = ps.get_data_parallel_rank(), sequence_multiple(ctx.model)
    lengths, rows = training_rows(*scored.table.columns(
        "prompt_index", "prompt_length", "completion_length"), g.micro_batch_tokens, multiple,
        g.shared_prompt)
    plan = plan_micro_batches(lengths, g.micro_batch_tokens, ps.get_data_parallel_world_size(),
                              width_multiple=multiple, rows=rows,
                              uniform=ps.get_pipeline_model_parallel_world_size() > 1)
    held = exchange.deliver(scored, plan, dp_rank, ctx.engines, prompts, device=ctx.device)
    return scored, plan, build_micro_batches(plan, held, scored.stats.advantages, ctx.pad_id,
                                             g.mask_truncated_completions, dp_rank, ctx.device)


def data_parallel_share(count: int) -> list[int]:
    """Indices of the items this data-parallel rank trains on (round robin; SFT rows)."""
    rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    return list(range(rank, count, size))


def save(ctx: Context, run, step: int) -> Path:
    """Atomic dist-checkpoint of model + optimizer + the loop's position (step; the data
    order, LR and sampler seeds are functions of (run.seed, step)) + each rank's RNG
    states; then `latest` points at it and only the newest run.keep_checkpoints stay."""
    from openr1_mega.checkpoint import dist as dist_ckpt

    root = Path(run.output_dir) / "checkpoints"
    path = dist_ckpt.save(ctx.model, ctx.optimizer, {"step": step, "seed": run.seed},
                          dist_ckpt.step_dir(root, step), overwrite=True,
                          rank_state=dist_ckpt.rng_state())
    dist_ckpt.commit(root, path, run.keep_checkpoints)
    return path


def resume(ctx: Context, run) -> int:
    """Load the newest intact checkpoint under run.output_dir (corrupt ones are reported and
    skipped) and drop metrics logged past it; returns the step to continue from, or 0
    (saying so) when there is none, as an auto-resumed first attempt of a job has none."""
    from openr1_mega.checkpoint import dist as dist_ckpt
    from openr1_mega.train.output_dir import truncate_metrics

    root = Path(run.output_dir) / "checkpoints"
    path = dist_ckpt.find_resumable(root)  # collective
    step = 0
    if path is not None:
        extra = dist_ckpt.load(ctx.model, ctx.optimizer, path, rank_state=True)
        if extra.get("seed", run.seed) != run.seed:
            raise ValueError(f"--resume: {path} was written with run.seed={extra['seed']}, "
                             f"this run has run.seed={run.seed} (the data order would differ)")
        if extra["rank_state"] is not None:
            dist_ckpt.set_rng_state(extra["rank_state"])
        step = int(extra["step"])
    if ctx.is_rank0:
        truncate_metrics(run.output_dir, step)
        print(f"--resume: continuing from {path} (step {step})" if path else
              f"--resume: no checkpoint under {root}; starting fresh", flush=True)
    return step


def save_and_exit(ctx: Context, run, step: int, logger) -> NoReturn:
    """Preempted (SIGTERM): checkpoint `step` unless it is the latest already, close the
    logs and exit 0, so the scheduler sees a clean end and a requeued `--resume` continues."""
    from openr1_mega.checkpoint import dist as dist_ckpt

    if dist_ckpt.latest_step(Path(run.output_dir) / "checkpoints") != step:
        save(ctx, run, step)
    logger.close()
    if ctx.is_rank0:
        print(f"preempted: checkpoint of step {step} written; exiting", flush=True)
    raise SystemExit(0)


def finish(ctx: Context, run, step: int, logger) -> None:
    """Final checkpoint (unless save_every just wrote it), HF export (model + tokenizer)
    and the metrics plot."""
    from openr1_mega.checkpoint import dist as dist_ckpt

    if dist_ckpt.latest_step(Path(run.output_dir) / "checkpoints") != step:
        save(ctx, run, step)
    if run.export_hf:
        save_hf(ctx.model, Path(run.output_dir) / "hf", assets_dir=ctx.model_dir)
    if ctx.is_rank0:
        from openr1_mega.utils.logging import plot_metrics, read_metrics

        if logger.path.exists():
            plot_metrics(read_metrics(logger.path),
                         ["reward/total/mean", "eval/accuracy", "eval/accuracy_greedy",
                          "completion_length/mean", "loss"],
                         Path(run.output_dir) / "metrics.png")
    logger.close()


def write_recipe(out_dir: str, recipe: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "recipe.json").write_text(json.dumps(recipe, indent=2))


def _hf_vocab_size(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
