"""Experience: one rollout batch as padded tensors, split into token-budgeted micro-batches.

Shapes (B completions, S = longest prompt + completion in a micro-batch):
  input_ids [B, S]     prompt + completion tokens, right-padded
  targets   [B, S-1]   input_ids shifted by one (the token each position predicts)
  mask      [B, S-1]   1 where the target is a completion token that gets loss
  sampler_logprobs [B, S-1]  vLLM's log-prob of each completion target, 0 elsewhere
  advantages [B]
Right padding keeps every real token's causal context intact, so no attention mask is
needed; micro-batches group completions of similar length to waste few padded tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openr1_mega.rl.rollout import Completion


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
    """Positions of these rows in the rollout batch (to scatter results back)."""


def micro_batches(completions: list[Completion], advantages: torch.Tensor, token_budget: int,
                  pad_id: int, mask_truncated: bool = False) -> list[MicroBatch]:
    """Split completions into micro-batches of at most `token_budget` padded tokens.

    Raises ValueError when a single completion is longer than the budget.
    """
    lengths = [len(c.prompt_ids) + len(c.completion_ids) for c in completions]
    too_long = [i for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        raise ValueError(f"completion {too_long[0]} has {lengths[too_long[0]]} tokens > "
                         f"grpo.micro_batch_tokens={token_budget}")
    order = sorted(range(len(completions)), key=lambda i: lengths[i])
    groups, current = [], []
    for i in order:
        width = max([lengths[j] for j in current] + [lengths[i]])
        if current and width * (len(current) + 1) > token_budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return [_collate([completions[i] for i in g], advantages[g], torch.tensor(g), pad_id,
                     mask_truncated) for g in groups]


def _collate(rows: list[Completion], advantages: torch.Tensor, index: torch.Tensor,
             pad_id: int, mask_truncated: bool) -> MicroBatch:
    width = max(len(c.prompt_ids) + len(c.completion_ids) for c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1)
    sampler = torch.zeros(len(rows), width - 1)
    for b, c in enumerate(rows):
        p, n = len(c.prompt_ids), len(c.completion_ids)
        ids[b, :p + n] = torch.tensor(c.prompt_ids + c.completion_ids)
        if not (mask_truncated and c.truncated):
            mask[b, p - 1:p - 1 + n] = 1.0
        if c.logprobs:
            sampler[b, p - 1:p - 1 + n] = torch.tensor(c.logprobs)
    positions = torch.arange(width).expand(len(rows), -1)
    return MicroBatch(ids, positions, ids[:, 1:], mask, sampler,
                      advantages.to(torch.float32), index)
