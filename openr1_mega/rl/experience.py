"""Experience: one rollout batch as padded tensors, split into token-budgeted micro-batches.

Shapes (B completions, S = longest prompt + completion in a micro-batch):
  input_ids [B, S]     prompt + completion tokens, right-padded
  targets   [B, S-1]   input_ids shifted by one (the token each position predicts)
  mask      [B, S-1]   1 where the target is a completion token that gets loss
  sampler_logprobs [B, S-1]  vLLM's log-prob of each completion target, 0 elsewhere
  advantages [B]
Right padding keeps every real token's causal context intact, so no attention mask is
needed; micro-batches group completions of similar length to waste few padded tokens.
S is rounded up to `width_multiple` (sequence/context parallelism split the sequence across
ranks); the extra columns are padding with mask 0, so they never reach the loss or metrics.
Tensors are built on `device`, the model's.
Planning (`plan_micro_batches`, from lengths only) is apart from building
(`build_micro_batches`, from the completions a rank holds), so that a data-parallel rank
receives only its own completions (rl/exchange.py) and still builds what planning over the
whole batch on every rank would give it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from openr1_mega.data.packing import round_up
from openr1_mega.rl.types import Completion


@dataclass
class MicroBatch:
    """A slice of the rollout batch, ready for the policy forward."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    advantages: torch.Tensor
    index: torch.Tensor
    """Positions of the real rows in the rollout batch (empty rows come after them)."""


@dataclass(frozen=True)
class MicroBatchPlan:
    """Which completions form which micro-batch, for every data-parallel rank at once.

    Made from lengths alone, so every rank computes the same plan from the step's metadata
    (rl/exchange.py) before it holds any completion. Positions index the rollout batch.
    """

    groups: list[list[int]]
    """Batch positions of each micro-batch over all ranks; rank r takes group[r::world]."""
    shapes: list[tuple[int, int]]
    """(rows, width) of each micro-batch, the same on every rank."""
    world: int
    """Data-parallel ranks the plan is dealt to."""

    def positions(self, rank: int) -> list[int]:
        """Batch positions data-parallel `rank` trains on, ascending."""
        return sorted(i for group in self.groups for i in group[rank::self.world])

    def trainer_of(self, num_completions: int) -> list[int]:
        """The data-parallel rank that trains each batch position, [num_completions]."""
        owner = [-1] * num_completions
        for group in self.groups:
            for k, i in enumerate(group):
                owner[i] = k % self.world
        return owner


def plan_micro_batches(lengths: Sequence[int], token_budget: int, world: int = 1, *,
                       width_multiple: int = 1, uniform: bool = False) -> MicroBatchPlan:
    """Plan micro-batches of at most `token_budget` padded tokens per rank.

    `lengths` are prompt + completion tokens of each completion of the whole batch. The
    completions sorted by length are grouped so that each group, split round-robin over the
    `world` ranks, fits the budget per rank. Every rank then runs the same number of
    micro-batches with the same shapes (short slices get empty rows, mask 0), which MoE
    expert parallelism needs: its token dispatch is a collective inside every forward. With
    `uniform` (pipeline parallelism: stages exchange one fixed activation shape) every
    micro-batch has the same [rows, width]: the step's longest width and as many rows as fit
    the budget. Raises ValueError when a single completion is longer than the budget.
    """
    lengths = [round_up(n, width_multiple) for n in lengths]
    too_long = [i for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        raise ValueError(f"completion {too_long[0]} has {lengths[too_long[0]]} tokens (padded "
                         f"to a multiple of {width_multiple}) > "
                         f"grpo.micro_batch_tokens={token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if uniform:
        width = max(lengths)
        per_rank = token_budget // width
        groups = [order[k:k + per_rank * world] for k in range(0, len(order), per_rank * world)]
        shapes = [(per_rank, width)] * len(groups)
    else:
        groups = _budget_groups(order, lengths, token_budget, world)
        shapes = [(-(-len(g) // world), max(lengths[j] for j in g)) for g in groups]
    return MicroBatchPlan(groups, shapes, world)


def build_micro_batches(plan: MicroBatchPlan, rows: Mapping[int, Completion],
                        advantages: torch.Tensor, pad_id: int, mask_truncated: bool = False,
                        rank: int = 0, device: torch.device | str = "cpu") -> list[MicroBatch]:
    """Data-parallel `rank`'s micro-batches of `plan`, from the completions it holds.

    `rows` maps batch position -> completion and must hold every position the plan gives
    this rank (other entries are ignored); `advantages` [B] covers the whole batch.
    """
    missing = [i for i in plan.positions(rank) if i not in rows]
    if missing:
        raise ValueError(f"data-parallel rank {rank} lacks completions {missing[:5]} "
                         f"({len(missing)} of its share) to build its micro-batches")
    advantages = advantages.to(device=device, dtype=torch.float32)
    batches = []
    for group, (num_rows, width) in zip(plan.groups, plan.shapes):
        mine = group[rank::plan.world]
        batches.append(_collate([rows[i] for i in mine], advantages[mine],
                                torch.tensor(mine, dtype=torch.long, device=device), pad_id,
                                mask_truncated, num_rows=num_rows, width=width, device=device))
    return batches


def micro_batches(completions: list[Completion], advantages: torch.Tensor, token_budget: int,
                  pad_id: int, mask_truncated: bool = False, rank: int = 0, world: int = 1,
                  *, width_multiple: int = 1, uniform: bool = False,
                  device: torch.device | str = "cpu") -> list[MicroBatch]:
    """This data-parallel rank's micro-batches when every rank holds the whole batch:
    `plan_micro_batches` over all completions, then `build_micro_batches`."""
    plan = plan_micro_batches([len(c.prompt_ids) + len(c.completion_ids) for c in completions],
                              token_budget, world, width_multiple=width_multiple,
                              uniform=uniform)
    return build_micro_batches(plan, dict(enumerate(completions)), advantages, pad_id,
                               mask_truncated, rank, device)


def _budget_groups(order: list[int], lengths: list[int], token_budget: int, world: int
                   ) -> list[list[int]]:
    """Consecutive runs of `order` whose longest member x rows per rank fits the budget."""
    groups, current = [], []
    for i in order:
        rows_per_rank = -(-(len(current) + 1) // world)
        if current and max(lengths[j] for j in current + [i]) * rows_per_rank > token_budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _collate(rows: list[Completion], advantages: torch.Tensor, index: torch.Tensor,
             pad_id: int, mask_truncated: bool, num_rows: int, width: int,
             device: torch.device | str) -> MicroBatch:
    """[num_rows, width] tensors on `device`; rows past len(rows) are empty (all padding,
    mask 0). Filled on the host, then moved in one copy per tensor."""
    ids = torch.full((num_rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros(num_rows, width - 1)
    sampler = torch.zeros(num_rows, width - 1)
    for b, c in enumerate(rows):
        p, n = len(c.prompt_ids), len(c.completion_ids)
        ids[b, :p + n] = torch.tensor(c.prompt_ids + c.completion_ids)
        if not (mask_truncated and c.truncated):
            mask[b, p - 1:p - 1 + n] = 1.0
        if c.logprobs:
            sampler[b, p - 1:p - 1 + n] = torch.tensor(c.logprobs)
    adv = torch.zeros(num_rows, device=device)
    adv[:len(rows)] = advantages
    ids = ids.to(device)
    positions = torch.arange(width, device=device).expand(num_rows, -1)
    return MicroBatch(ids, positions, ids[:, 1:], mask.to(device), sampler.to(device), adv,
                      index)
