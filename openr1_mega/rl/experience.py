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
"""

from __future__ import annotations

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


def micro_batches(completions: list[Completion], advantages: torch.Tensor, token_budget: int,
                  pad_id: int, mask_truncated: bool = False, rank: int = 0, world: int = 1,
                  *, width_multiple: int = 1, uniform: bool = False,
                  device: torch.device | str = "cpu") -> list[MicroBatch]:
    """This data-parallel rank's micro-batches of at most `token_budget` padded tokens.

    The plan is made over the whole batch, identically on every rank: completions sorted
    by length are grouped so that each group, split round-robin over the `world` ranks,
    fits the budget per rank. Every rank then runs the same number of micro-batches with
    the same shapes (short slices get empty rows, mask 0), which MoE expert parallelism
    needs: its token dispatch is a collective inside every forward. With `uniform` (pipeline
    parallelism: stages exchange one fixed activation shape) every micro-batch has the
    same [rows, width]: the step's longest width and as many rows as fit the budget.
    Raises ValueError when a single completion is longer than the budget.
    """
    lengths = [round_up(len(c.prompt_ids) + len(c.completion_ids), width_multiple)
               for c in completions]
    too_long = [i for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        raise ValueError(f"completion {too_long[0]} has {lengths[too_long[0]]} tokens (padded "
                         f"to a multiple of {width_multiple}) > "
                         f"grpo.micro_batch_tokens={token_budget}")
    order = sorted(range(len(completions)), key=lambda i: lengths[i])
    if uniform:
        width = max(lengths)
        per_rank = token_budget // width
        groups = [order[k:k + per_rank * world] for k in range(0, len(order), per_rank * world)]
        shapes = [(per_rank, width)] * len(groups)
    else:
        groups = _budget_groups(order, lengths, token_budget, world)
        shapes = [(-(-len(g) // world), max(lengths[j] for j in g)) for g in groups]
    advantages = advantages.to(device=device, dtype=torch.float32)
    batches = []
    for group, (rows, width) in zip(groups, shapes):
        mine = group[rank::world]
        batches.append(_collate([completions[i] for i in mine], advantages[mine],
                                torch.tensor(mine, dtype=torch.long, device=device), pad_id,
                                mask_truncated, num_rows=rows, width=width, device=device))
    return batches


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
