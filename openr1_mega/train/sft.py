"""Supervised fine-tuning (distillation) on conversations, on Megatron-Core.

    1. conversations (`messages`) -> token ids + assistant-only loss mask (data/chat.py);
       a held-out share gives the eval loss;
    2. packing: conversations fill rows of `seq_length` tokens, attention kept inside each
       conversation (PackedSeqParams, thd: block-diagonal causal), positions restarting
       per conversation; or, with pack=False, one padded conversation per row;
       rows are as wide as sequence/context parallelism needs (padding gets no loss);
    3. each step: `rows_per_step` rows as micro-batches, moved to the model's device; loss =
       token-mean NLL over the assistant tokens of the whole step (the same on every split
       of the step, logged as the step's global value); warmup + cosine LR, grad clipping
       (train/step.py; Megatron's pipeline schedule, so PP > 1 works);
    4. eval loss every `eval_every` steps (forward-only schedule); checkpoints; HF export.

    python -m openr1_mega.train.sft --recipe examples/recipes/tiny/sft.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m openr1_mega.train.sft --recipe R.yaml parallel.tp=2
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from tqdm import tqdm

from openr1_mega.config.load import load_config, to_dict
from openr1_mega.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
from openr1_mega.config.train import OptimConfig, RunConfig, SftConfig
from openr1_mega.data.chat import encode_conversation, prompt_messages
from openr1_mega.data.packing import Packed, pack_examples, pad_examples, round_up
from openr1_mega.data.prompts import load_rows
from openr1_mega.models.hidden import forward_hidden
from openr1_mega.train import dry_run, preemption
from openr1_mega.train import policy as policy_lib
from openr1_mega.train.cli import parse_entry_args
from openr1_mega.train.guard import BadStepGuard
from openr1_mega.train.logprobs import hidden_to_logprobs
from openr1_mega.train.output_dir import prepare_output_dir
from openr1_mega.train.perf import StepPerf
from openr1_mega.train.step import (
    cosine_lr,
    forward_only,
    scaled_loss,
    sequence_multiple,
    train_step,
)
from openr1_mega.utils.logging import MetricsLogger


@dataclass
class SftRecipe:
    """An SFT recipe: the model side (schema.py) plus optim, sft and run sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    run: RunConfig = field(default_factory=RunConfig)


def main(argv: list[str] | None = None) -> dict:
    """Run SFT from a recipe; returns the final metrics."""
    args = parse_entry_args(argv, __doc__.splitlines()[0])
    if args.dry_run:  # validate + print the plan; no process group, no model
        return dry_run.main(args.recipe, args.overrides, SftRecipe, args.world_size)
    recipe = load_config(args.recipe, args.overrides, SftRecipe)
    prepare_output_dir(recipe.run, args.resume)
    preemption.install()
    s = recipe.sft
    ctx = policy_lib.setup(recipe)
    dp = ps.get_data_parallel_world_size()
    if s.rows_per_step % dp:
        raise ValueError(f"sft.rows_per_step={s.rows_per_step} must be a multiple of the "
                         f"data-parallel size {dp} (every rank runs the same micro-batches)")
    train_rows, eval_rows = sft_rows(recipe, ctx.tokenizer, sequence_multiple(ctx.model),
                                     uniform=ps.get_pipeline_model_parallel_world_size() > 1)
    steps = math.ceil(s.epochs * len(train_rows) / s.rows_per_step)
    steps = min(steps, s.max_steps or steps)
    start = policy_lib.resume(ctx, recipe.run) if args.resume else 0
    logger = MetricsLogger(recipe.run.output_dir, enabled=ctx.is_rank0)
    if ctx.is_rank0:
        policy_lib.write_recipe(recipe.run.output_dir, to_dict(recipe))
    last: dict = {}
    guard = BadStepGuard(recipe.run.max_bad_steps, recipe.run.output_dir)
    perf = StepPerf.for_run(ctx, recipe)
    # Collectives: every rank reaches each line of this loop body.
    for step in tqdm(range(start, steps), desc="sft", disable=not ctx.is_rank0, initial=start,
                     total=steps):
        rows = policy_lib.items_for_step(train_rows, step, s.rows_per_step, recipe.run.seed)
        mine = [rows[i] for i in policy_lib.data_parallel_share(len(rows))]
        denominator = _global_tokens(rows)
        started = time.perf_counter()
        last = train_step(ctx.ddp, ctx.optimizer, mine,  # collective
                          sft_forward(ctx, denominator, len(mine)),
                          lr=cosine_lr(step, steps, recipe.optim), metric_names=("loss",),
                          shape=_row_shape(mine))
        guard.check(step, last)
        last["tokens"] = denominator
        last.update(perf.metrics(_document_lengths(rows), time.perf_counter() - started))
        if eval_rows and (s.eval_every and (step + 1) % s.eval_every == 0 or step + 1 == steps):
            last["eval/loss"] = eval_loss(ctx, eval_rows)  # collective
        if ctx.is_rank0 and (step % recipe.run.log_every == 0 or step + 1 == steps):
            logger.log(step + 1, last)
        if recipe.run.save_every and (step + 1) % recipe.run.save_every == 0:
            policy_lib.save(ctx, recipe.run, step + 1)
        if preemption.requested():  # collective: every rank stops after the same step
            policy_lib.save_and_exit(ctx, recipe.run, step + 1, logger)
    perf.close()
    policy_lib.finish(ctx, recipe.run, steps, logger)
    return last


def sft_rows(recipe, tokenizer, width_multiple: int = 1, uniform: bool = False
             ) -> tuple[list[Packed], list[Packed]]:
    """Tokenise, split off the held-out share, and pack (or pad) both parts into rows whose
    width is a multiple of `width_multiple`; with `uniform` (pipeline parallelism) unpacked
    rows are all padded to the longest conversation's width."""
    s, seed = recipe.sft, recipe.run.seed
    examples = [encode_conversation(tokenizer, m, max_length=s.seq_length)
                for m in conversations(s, seed)]
    random.Random(seed).shuffle(examples)
    n_eval = int(len(examples) * s.eval_fraction)
    pad = tokenizer.pad_token_id or 0
    width = max(len(ex.input_ids) for ex in examples) if uniform and examples else None
    return (_rows(examples[n_eval:], s, pad, width_multiple, width),
            _rows(examples[:n_eval], s, pad, width_multiple, width))


def conversations(s: SftConfig, seed: int) -> list[list[dict]]:
    """`messages` per row; a built-in task becomes (problem -> solver trace) conversations."""
    if s.source.startswith("task:"):
        rows = load_rows(s.source, "train", s.num_train, seed, required=("problem", "solution"),
                         on_bad_row=s.on_bad_row)
        return [prompt_messages(r["problem"], s.system_prompt)
                + [{"role": "assistant", "content": r["solution"]}] for r in rows]
    rows = load_rows(s.source, "train", None, seed, required=(),
                     conversation_fields=(s.messages_field,), on_bad_row=s.on_bad_row)
    return [list(r[s.messages_field]) for r in rows]


def _rows(examples, s: SftConfig, pad_id: int, width_multiple: int = 1,
          width: int | None = None) -> list[Packed]:
    if not examples:
        return []
    if s.pack:
        return pack_examples(examples, round_up(s.seq_length, width_multiple), pad_id)
    return [pad_examples([ex], pad_id, width_multiple, width) for ex in examples]


def _row_shape(rows: list[Packed]) -> tuple[int, int]:
    """(1, width) of the widest row: what the pipeline schedule is told (all rows share it
    under PP)."""
    return 1, max(r.input_ids.shape[-1] for r in rows)


def sft_forward(ctx, denominator: float, num_microbatches: int):
    """Megatron forward-step function: one packed (or padded) row, NLL over its tokens."""

    def forward_step(row: Packed, model):
        row = _to_device(row, ctx.device)
        output = forward_hidden(model, **_model_inputs(row))

        def loss_func(hidden):
            nll = -_row_logprobs(ctx, model, hidden, row) * row.loss_mask.view(1, -1)
            loss = nll.sum() / denominator
            return scaled_loss(loss, num_microbatches), {"loss": loss.detach()}

        return output, loss_func

    return forward_step


def eval_loss(ctx, rows: list[Packed]) -> float:
    """Token-mean NLL over held-out rows (forward-only pipeline schedule; every rank holds
    the same rows, so the last stage's sum is the answer: reduced over the pipeline group).
    """
    def step(row: Packed, model):
        row = _to_device(row, ctx.device)
        return forward_hidden(model, **_model_inputs(row)), lambda hidden: (
            hidden.new_zeros(()),
            {"nll": -(_row_logprobs(ctx, model, hidden, row) * row.loss_mask.view(1, -1)).sum()})

    ctx.model.eval()
    out = forward_only(ctx.ddp, rows, step, _row_shape(rows))
    ctx.model.train()
    total = torch.stack([m["nll"].double() for m in out]).sum() if out else \
        torch.zeros((), dtype=torch.float64, device=ctx.device)
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total) / max(sum(r.num_tokens for r in rows), 1)


def _to_device(row: Packed, device: torch.device) -> Packed:
    return Packed(*(getattr(row, f).to(device) for f in
                    ("input_ids", "labels", "loss_mask", "position_ids", "cu_seqlens")))


def _model_inputs(row: Packed) -> dict:
    """GPTModel arguments for one row: ids [1, S], positions [1, S], no mask, packing."""
    inputs = {"input_ids": row.input_ids.view(1, -1),
              "position_ids": row.position_ids.view(1, -1), "attention_mask": None}
    if len(row.cu_seqlens) > 2:  # several documents: attention stays inside each
        cu = row.cu_seqlens.to(torch.int32)
        longest = int(cu.diff().max())
        inputs["packed_seq_params"] = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
            max_seqlen_kv=longest)
    return inputs


def _row_logprobs(ctx, model, hidden: torch.Tensor, row: Packed) -> torch.Tensor:
    """log p(label) [1, S] of one row from the final hidden states (no [S, V] logits)."""
    return hidden_to_logprobs(model, hidden, row.labels.view(1, -1), ctx.vocab_size)


def _document_lengths(rows: list[Packed]) -> list[int]:
    """Tokens of every document packed into the step's rows (all DP ranks): attention runs
    per document (cu_seqlens), so FLOPs count per document."""
    return [int(n) for r in rows for n in r.cu_seqlens.diff() if n > 0]


def _global_tokens(rows: list[Packed]) -> float:
    """Assistant tokens in the whole step (all DP ranks hold the same list)."""
    return float(max(sum(r.num_tokens for r in rows), 1))


if __name__ == "__main__":
    main()
