"""Experience: one rollout batch as tensors, split into token-budgeted micro-batches.

The model reads rows; the loss reads completions (R rows of width S, C completions, T = the
longest completion of the micro-batch):
  input_ids, position_ids [R, S]   tokens of each row, right-padded
  shared    the attention layout of shared-prompt rows (models/shared_prompt.py), else None
            (causal attention within each row)
  sources   [C, T]  the final hidden state that predicts each completion token, as a flat
                    index s * R + r into the model's [S, R, H] hidden states
  targets   [C, T]  the completion tokens
  mask      [C, T]  1 where the target gets loss
  sampler_logprobs [C, T]  vLLM's log-prob of each completion token
  advantages [C]
Only completion tokens are scored: the output layer never runs on prompt or padding
positions. A row is one prompt + one completion, or, with `shared_prompt_rows`, one copy of a
prompt followed by several of its completions: each completion attends to the prompt and to
itself, its RoPE positions continue the prompt's, so its log-probs are those of
prompt + completion alone, while the prompt is computed once instead of G times.
Right padding keeps every real token's causal context intact; micro-batches group rows of
similar length to waste few padded tokens. S is rounded up to `width_multiple` (sequence/
context parallelism split the sequence across ranks); the extra columns are padding that
no completion token reads. Tensors are built on `device`, the model's.
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
from openr1_mega.models.shared_prompt import SharedPromptParams, shared_prompt_params
from openr1_mega.rl.types import Completion


@dataclass
class MicroBatch:
    """A slice of the rollout batch, ready for the policy forward (shapes: module docstring)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    shared: SharedPromptParams | None
    sources: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    advantages: torch.Tensor
    index: torch.Tensor
    """Positions in the rollout batch of the real completions (empty slots come after them)."""


@dataclass(frozen=True)
class MicroBatchPlan:
    """Which rows form which micro-batch, for every data-parallel rank at once.

    Made from lengths alone, so every rank computes the same plan from the step's metadata
    (rl/exchange.py) before it holds any completion. Positions index the rollout batch.
    """

    groups: list[list[int]]
    """Row ids of each micro-batch over all ranks; rank r takes group[r::world]."""
    shapes: list[tuple[int, int]]
    """(rows, width) of each micro-batch, the same on every rank."""
    world: int
    """Data-parallel ranks the plan is dealt to."""
    rows: list[list[int]]
    """Batch positions of the completions of each row (one, or a prompt's several when
    prompts are shared)."""
    lengths: list[int]
    """Tokens of each row before padding: what the model computes."""
    shared_prompt: bool = False
    """Rows hold one prompt and several of its completions (`shared_prompt_rows`)."""

    def positions(self, rank: int) -> list[int]:
        """Batch positions data-parallel `rank` trains on, ascending."""
        return sorted(i for group in self.groups for row in group[rank::self.world]
                      for i in self.rows[row])

    def trainer_of(self, num_completions: int) -> list[int]:
        """The data-parallel rank that trains each batch position, [num_completions]."""
        owner = [-1] * num_completions
        for group in self.groups:
            for k, row in enumerate(group):
                for i in self.rows[row]:
                    owner[i] = k % self.world
        return owner


def shared_prompt_rows(prompt_indices: Sequence[int], prompt_lengths: Sequence[int],
                       completion_lengths: Sequence[int], token_budget: int,
                       width_multiple: int = 1) -> tuple[list[list[int]], list[int]]:
    """Rows of one prompt followed by its completions, and each row's tokens.

    A prompt's completions (batch order) fill rows of at most `token_budget` tokens (the
    prompt counted once per row, widths rounded to `width_multiple`); a completion that
    does not fit even alone gets a row of its own, which planning then reports.
    """
    by_prompt: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_indices):
        by_prompt.setdefault(p, []).append(i)
    rows, lengths = [], []
    for p, members in by_prompt.items():
        prompt = prompt_lengths[members[0]]
        if any(prompt_lengths[i] != prompt for i in members):
            raise ValueError(f"prompt {p}: its completions carry prompts of different lengths "
                             f"{sorted({prompt_lengths[i] for i in members})}")
        row, used = [], prompt
        for i in members:
            if row and round_up(used + completion_lengths[i], width_multiple) > token_budget:
                rows.append(row)
                lengths.append(used)
                row, used = [], prompt
            row.append(i)
            used += completion_lengths[i]
        rows.append(row)
        lengths.append(used)
    return rows, lengths


def training_rows(prompt_indices: Sequence[int], prompt_lengths: Sequence[int],
                  completion_lengths: Sequence[int], token_budget: int, width_multiple: int = 1,
                  shared_prompt: bool = False) -> tuple[list[int], list[list[int]] | None]:
    """(tokens of each row, each row's completions) for `plan_micro_batches`: one row per
    completion (None: the plan's default), or with `shared_prompt` the rows of
    `shared_prompt_rows`."""
    if not shared_prompt:
        return [p + n for p, n in zip(prompt_lengths, completion_lengths, strict=True)], None
    rows, lengths = shared_prompt_rows(prompt_indices, prompt_lengths, completion_lengths,
                                       token_budget, width_multiple)
    return lengths, rows


def plan_micro_batches(lengths: Sequence[int], token_budget: int, world: int = 1, *,
                       width_multiple: int = 1, uniform: bool = False,
                       rows: list[list[int]] | None = None) -> MicroBatchPlan:
    """Plan micro-batches of at most `token_budget` padded tokens per rank.

    `lengths[k]` are the tokens of row k; `rows[k]` the batch positions of its completions
    (default: row k is completion k, prompt + completion tokens; `shared_prompt_rows` makes
    rows of several). The rows sorted by length are grouped so that each group, split
    round-robin over the `world` ranks, fits the budget per rank. Every rank then runs the
    same number of micro-batches with the same shapes (short slices get empty rows),
    which MoE expert parallelism needs: its token dispatch is a collective inside every
    forward. With `uniform` (pipeline parallelism: stages exchange one fixed activation
    shape) every micro-batch has the same [rows, width]: the step's longest width and as
    many rows as fit the budget. Raises ValueError when a single row is longer than the
    budget.
    """
    shared, tokens = rows is not None, list(lengths)
    rows = [[k] for k in range(len(lengths))] if rows is None else rows
    lengths = [round_up(n, width_multiple) for n in lengths]
    too_long = [k for k, n in enumerate(lengths) if n > token_budget]
    if too_long:
        k = too_long[0]
        raise ValueError(f"completion {rows[k][0]} has {lengths[k]} tokens with its prompt "
                         f"(padded to a multiple of {width_multiple}) > "
                         f"grpo.micro_batch_tokens={token_budget}")
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    if uniform:
        width = max(lengths)
        per_rank = token_budget // width
        groups = [order[k:k + per_rank * world] for k in range(0, len(order), per_rank * world)]
        shapes = [(per_rank, width)] * len(groups)
    else:
        groups = _budget_groups(order, lengths, token_budget, world)
        shapes = [(-(-len(g) // world), max(lengths[j] for j in g)) for g in groups]
    return MicroBatchPlan(groups, shapes, world, rows, tokens, shared)


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
        members = [plan.rows[k] for k in group[rank::plan.world]]
        batch = _Layout(num_rows, width, pad_id, mask_truncated)
        for r, positions in enumerate(members):
            batch.add_row(r, [rows[i] for i in positions])
        mine = [i for positions in members for i in positions]
        batches.append(batch.finish(advantages[mine], torch.tensor(mine, dtype=torch.long),
                                    plan.shared_prompt, device))
    return batches


def micro_batches(completions: list[Completion], advantages: torch.Tensor, token_budget: int,
                  pad_id: int, mask_truncated: bool = False, rank: int = 0, world: int = 1,
                  *, width_multiple: int = 1, uniform: bool = False, shared_prompt: bool = False,
                  device: torch.device | str = "cpu") -> list[MicroBatch]:
    """This data-parallel rank's micro-batches when every rank holds the whole batch:
    `plan_micro_batches` over the rows of `training_rows`, then `build_micro_batches`."""
    lengths, rows = training_rows(
        [c.prompt_index for c in completions], [len(c.prompt_ids) for c in completions],
        [len(c.completion_ids) for c in completions], token_budget, width_multiple,
        shared_prompt)
    plan = plan_micro_batches(lengths, token_budget, world, width_multiple=width_multiple,
                              uniform=uniform, rows=rows)
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


class _Layout:
    """One micro-batch filled on the host row by row, then moved in one copy per tensor."""

    def __init__(self, num_rows: int, width: int, pad_id: int, mask_truncated: bool):
        self.num_rows, self.width = num_rows, width
        self.pad_id, self.mask_truncated = pad_id, mask_truncated
        self.ids = torch.full((num_rows, width), pad_id, dtype=torch.long)
        self.positions = torch.arange(width).repeat(num_rows, 1)
        self.rows: list[tuple[int, list[int]]] = []
        """(prompt tokens, [completion tokens, ...]) of each filled row."""
        self.completions: list[tuple[torch.Tensor, torch.Tensor, Completion]] = []
        """(where each token is scored, its token ids, the completion) in row order."""

    def add_row(self, r: int, completions: list[Completion]) -> None:
        """Row r: the prompt once, then each completion; records where each is scored."""
        prompt = completions[0].prompt_ids
        p = len(prompt)
        self.ids[r, :p] = torch.tensor(prompt)
        start = p
        for c in completions:
            ids = torch.tensor(c.completion_ids, dtype=torch.long)
            n = len(ids)
            self.ids[r, start:start + n] = ids
            self.positions[r, start:start + n] = torch.arange(p, p + n)
            source = torch.arange(start - 1, start + n - 1)  # the token before each one ...
            source[:1] = p - 1  # ... the first one's is the prompt's last
            self.completions.append((source * self.num_rows + r, ids, c))
            start += n
        self.rows.append((p, [len(c.completion_ids) for c in completions]))

    def finish(self, advantages: torch.Tensor, index: torch.Tensor, shared_prompt: bool,
               device: torch.device | str) -> MicroBatch:
        steps = max([len(ids) for _, ids, _ in self.completions] + [1])
        count = max(len(self.completions), 1)
        sources = torch.zeros(count, steps, dtype=torch.long)
        targets = torch.full((count, steps), self.pad_id, dtype=torch.long)
        mask = torch.zeros(count, steps)
        sampler = torch.zeros(count, steps)
        for k, (source, ids, c) in enumerate(self.completions):
            n = len(ids)
            sources[k, :n] = source
            targets[k, :n] = ids
            mask[k, :n] = 0.0 if self.mask_truncated and c.truncated else 1.0
            if c.logprobs:
                sampler[k, :n] = torch.tensor(c.logprobs)
        adv = torch.zeros(count, device=device)
        adv[:len(advantages)] = advantages
        shared = shared_prompt_params(self.rows, self.num_rows, self.width, device) \
            if shared_prompt else None
        return MicroBatch(self.ids.to(device), self.positions.to(device), shared,
                          sources.to(device), targets.to(device), mask.to(device),
                          sampler.to(device), adv, index.to(device))
