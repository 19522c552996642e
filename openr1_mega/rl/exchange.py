"""Rollout results between ranks, as tensors: scored where they were sampled, delivered where
they are trained.

After generation every rank of engine k holds the completions of the prompts engine k
sampled (rl/engine_groups.py: engine k = ranks [k*T, (k+1)*T)). One step then runs:

  1. `score`: rank j of an engine scores the engine's prompts [j::T], whole prompts (a
     group-relative reward such as `length` sees all G completions of its prompt). The
     RewardSet lives on every rank.
  2. The table: every rank all-gathers, over the world, one float64 row per completion it
     scored (TABLE_COLUMNS, then one value per reward, NaN for None): a few numbers per
     completion, never token ids. Sorted by (prompt, sample) it is the batch in the order
     one engine over all prompts gives, so every rank computes from it, exactly as the
     single-process path (compute_rewards + grpo_advantage_stats over the whole batch):
     the totals, the advantages, the zero-std group count, each reward's mean/std/skipped
     and total/mean, total/std. The brief's per-engine totals gather and advantage pass
     would carry a subset of the same numbers in one more collective, so they are folded
     into the table. Counters (errors, nonfinite, deadline misses, a family's own counts
     such as `accuracy/timeouts`) are summed over the world; `seconds` is the slowest
     rank's, the time the step waited.
  3. `deliver`: the micro-batch plan (rl/experience.py, from the table's lengths alone)
     names the data-parallel rank that trains each completion; every rank of that DP rank
     (its model-parallel group) needs the completion's token ids and sampler log-probs. A
     rank of the engine that sampled it already holds it; otherwise the rank that scored
     it sends it. One all_to_all_single of token ids (int64) and one of log-probs (float32)
     move them; split sizes follow from the table, so receivers preallocate exactly.

No object collectives: every collective here moves a tensor on the default group, on
`device` (the model's: NCCL needs CUDA tensors, gloo CPU ones). Every rank must call `score`
and `deliver` (collective), with the same prompts and plan.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from openr1_mega import ops
from openr1_mega.rl.engine_groups import EngineGroups
from openr1_mega.rl.experience import MicroBatchPlan
from openr1_mega.rl.rewards.combine import RewardSet, mean_std
from openr1_mega.rl.types import Completion

TABLE_COLUMNS = ("prompt_index", "sample", "prompt_length", "completion_length", "truncated",
                 "total")
"""The fixed columns of a table row; one column per reward follows (value, NaN = None)."""
_COUNTERS = ("errors", "nonfinite", "deadline_misses")
_STANDARD = ("mean", "std", "skipped", "skipped_frac", *_COUNTERS, "seconds")


class TableEntry(NamedTuple):
    """One completion's metadata (what the guard and the step's log read)."""

    prompt_index: int
    prompt_length: int
    completion_length: int
    truncated: bool


@dataclass
class CompletionTable:
    """Metadata of every completion of the step, in batch order, identical on every rank.

    rows [B, len(TABLE_COLUMNS) + R] float64; scorer [B] the global rank that scored (and
    sends) each completion.
    """

    rows: torch.Tensor
    scorer: list[int]

    def __len__(self) -> int:
        """B, the completions of the whole step."""
        return self.rows.shape[0]

    def column(self, name: str) -> torch.Tensor:
        """[B] float64 values of one of TABLE_COLUMNS."""
        return self.rows[:, TABLE_COLUMNS.index(name)]

    def entries(self) -> list[TableEntry]:
        """Each completion's metadata as Python values, in batch order."""
        cols = self.columns("prompt_index", "prompt_length", "completion_length", "truncated")
        return [TableEntry(p, lp, lc, bool(t)) for p, lp, lc, t in zip(*cols)]

    def columns(self, *names: str) -> list[list[int]]:
        """Integer columns of TABLE_COLUMNS as Python lists, in batch order."""
        return [self.column(n).long().tolist() for n in names]

    def lengths(self) -> list[int]:
        """Prompt + completion tokens of each completion (what micro-batches are planned on)."""
        return (self.column("prompt_length") + self.column("completion_length")).long().tolist()

    def totals(self) -> torch.Tensor:
        """[B] float32 reward totals, as the advantage kernel reads them."""
        return self.column("total").float()


@dataclass
class ScoredRollout:
    """A scored step as one rank sees it."""

    table: CompletionTable
    held: dict[int, Completion]
    """Batch position -> completion, for every completion this rank's engine sampled."""
    stats: ops.GrpoAdvantageStats
    """Advantages [B] and group statistics over the whole batch."""
    metrics: dict[str, float]
    """compute_rewards' metrics of the whole batch (same keys on every rank)."""


def score(completions: list[Completion], prompts: list[dict], engines: EngineGroups,
          rewards: RewardSet, group_size: int, scale: str = "group",
          device: torch.device | str = "cpu") -> ScoredRollout:
    """Score this rank's share of its engine's `completions` and assemble the step's table.

    Args:
        completions: every completion this rank's engine sampled, grouped by prompt, the
            samples of a prompt in the engine's order (rl/rollout.py `generate`).
        prompts: the step's prompt rows (every rank holds all of them).
        engines: this rank's place among the engines.
        rewards, group_size, scale: the reward set and the advantage options.
    Collective (default group).
    """
    local, local_metrics = _score_rows(_scoring_share(completions, engines), prompts, rewards)
    rows, scorer = _all_gather_rows(local, device)
    keys = list(zip(rows[:, 0].long().tolist(), rows[:, 1].long().tolist()))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    table = CompletionTable(rows[order], [scorer[i] for i in order])
    position = {keys[i]: k for k, i in enumerate(order)}
    held = {position[(c.prompt_index, j)]: c for c, j in _with_samples(completions)}
    stats = ops.grpo_advantage_stats(table.totals(), group_size=group_size, scale=scale)
    names = [r.name for r in rewards.rewards]
    return ScoredRollout(table, held, stats,
                         _batch_metrics(table, names, local_metrics, device))


def deliver(scored: ScoredRollout, plan: MicroBatchPlan, dp_rank: int, engines: EngineGroups,
            prompts: list[dict], device: torch.device | str = "cpu") -> dict[int, Completion]:
    """The completions data-parallel rank `dp_rank` trains on under `plan`, by batch position.

    Completions held by this rank's engine are taken as they are; the others arrive as
    token ids and sampler log-probs (empty log-probs travel as zeros, which builds the same
    micro-batch) and are rebuilt with the prompt's ids and no text (training reads ids).
    Collective (default group).
    """
    table, me = scored.table, dist.get_rank()
    ranks_of = defaultdict(list)  # data-parallel rank -> its global ranks
    for rank, d in enumerate(_all_gather_ints(dp_rank, device)):
        ranks_of[d].append(rank)
    trainer = plan.trainer_of(len(table))
    sends = [[] for _ in range(dist.get_world_size())]  # positions for each rank, ascending
    receives = [[] for _ in range(dist.get_world_size())]  # positions from each rank
    for i, scorer in enumerate(table.scorer):
        engine = scorer // engines.size  # the engine that sampled it holds it
        if scorer == me:
            for q in ranks_of[trainer[i]]:
                if q // engines.size != engine:
                    sends[q].append(i)
        if trainer[i] == dp_rank and me // engines.size != engine:
            receives[scorer].append(i)
    arrived = _move_tokens(scored, sends, receives, device)
    entries = table.entries()
    out = {i: scored.held[i] for i in plan.positions(dp_rank) if i in scored.held}
    for i, (ids, logprobs) in arrived.items():
        out[i] = _rebuilt(entries[i], prompts, ids, logprobs)
    return out


def _scoring_share(completions: list[Completion], engines: EngineGroups) -> list:
    """(completion, sample) pairs of the engine's prompts [rank::size]: whole prompts."""
    prompts = sorted({c.prompt_index for c in completions})
    keep = set(prompts[engines.rank::engines.size])
    return [(c, j) for c, j in _with_samples(completions) if c.prompt_index in keep]


def _with_samples(completions: list[Completion]) -> list[tuple[Completion, int]]:
    """Each completion with its sample number inside its prompt's group."""
    seen: dict[int, int] = {}
    out = []
    for c in completions:
        seen[c.prompt_index] = seen.get(c.prompt_index, -1) + 1
        out.append((c, seen[c.prompt_index]))
    return out


def _score_rows(mine: list, prompts: list[dict], rewards: RewardSet
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Table rows [n, C] float64 of the pairs in `mine`, and compute_rewards' local metrics
    ({} when this rank scores nothing: its counters are zero)."""
    names = [r.name for r in rewards.rewards]
    if not mine:
        return torch.zeros(0, len(TABLE_COLUMNS) + len(names), dtype=torch.float64), {}
    completions = [c for c, _ in mine]
    totals, values, metrics = rewards(*reward_inputs(completions, prompts))
    rows = [[c.prompt_index, j, len(c.prompt_ids), len(c.completion_ids), c.truncated, total]
            + [math.nan if values[n][k] is None else values[n][k] for n in names]
            for k, ((c, j), total) in enumerate(zip(mine, totals))]
    return torch.tensor(rows, dtype=torch.float64), metrics


def reward_inputs(completions: list[Completion], prompts: list[dict]):
    """Completion texts and the per-completion dataset columns the rewards read."""
    columns = {k: [prompts[c.prompt_index][k] for c in completions]
               for k in prompts[0] if k != "prompt_ids"}
    columns["completion_lengths"] = [len(c.completion_ids) for c in completions]
    return [c.text for c in completions], columns


def _batch_metrics(table: CompletionTable, names: list[str], local: dict[str, float],
                   device) -> dict[str, float]:
    """compute_rewards' metrics of the whole batch: values from the table, counters summed
    and seconds maxed over the world. Collective."""
    family = _union_of_names(sorted(k for k in local if k.split("/", 1)[1] not in _STANDARD),
                             device)
    counters = [f"{n}/{c}" for n in names for c in _COUNTERS] + family
    sums = torch.tensor([local.get(k, 0.0) for k in counters], dtype=torch.float64,
                        device=device)
    slowest = torch.tensor([local.get(f"{n}/seconds", 0.0) for n in names],
                           dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    summed = dict(zip(counters, sums.tolist()))
    metrics: dict[str, float] = {}
    for k, name in enumerate(names):
        values = table.rows[:, len(TABLE_COLUMNS) + k].tolist()
        present = [v for v in values if not math.isnan(v)]
        skipped = len(values) - len(present)
        metrics[f"{name}/mean"], metrics[f"{name}/std"] = mean_std(present)
        metrics[f"{name}/skipped"] = float(skipped)
        metrics[f"{name}/skipped_frac"] = skipped / len(values) if values else 0.0
        metrics.update({f"{name}/{c}": summed[f"{name}/{c}"] for c in _COUNTERS})
        metrics[f"{name}/seconds"] = slowest[k].item()
    metrics.update({key: summed[key] for key in family})
    metrics["total/mean"], metrics["total/std"] = mean_std(table.column("total").tolist())
    return metrics


def _all_gather_rows(local: torch.Tensor, device) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows [n_r, C] stacked in rank order, and the rank each row came from.
    Collective: the row counts, then the rows padded to the largest count."""
    counts = _all_gather_ints(local.shape[0], device)
    padded = torch.zeros(max(counts), local.shape[1], dtype=torch.float64, device=device)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    rows = torch.cat([part[:n] for part, n in zip(parts, counts)]).cpu()
    return rows, [r for r, n in enumerate(counts) for _ in range(n)]


def _all_gather_ints(value: int, device) -> list[int]:
    """One int from every rank, in rank order. Collective."""
    mine = torch.tensor([value], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [int(p) for p in parts]


def _union_of_names(names: list[str], device) -> list[str]:
    """The sorted union of every rank's `names` (the family counters a rank saw: the code
    reward only reports outcomes that occurred), as bytes in a tensor. Collective."""
    data = torch.tensor(list("\n".join(names).encode()), dtype=torch.uint8)
    sizes = _all_gather_ints(data.numel(), device)
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[:data.numel()] = data.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    texts = (bytes(p[:n].cpu().tolist()).decode() for p, n in zip(parts, sizes))
    return sorted({name for text in texts for name in text.split("\n") if name})


def _move_tokens(scored: ScoredRollout, sends: list[list[int]], receives: list[list[int]],
                 device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Send completion tokens and log-probs per `sends[q]` (positions for rank q), receive
    `receives[p]` (positions from rank p). Collective: two all_to_all_single."""
    lengths = scored.table.column("completion_length").long().tolist()
    out_ids, out_logprobs = [], []
    for q in sends:
        for i in q:
            c = scored.held[i]
            out_ids.append(torch.tensor(c.completion_ids, dtype=torch.long))
            out_logprobs.append(_sampler_logprobs(c, i))
    send_sizes = [sum(lengths[i] for i in q) for q in sends]
    recv_sizes = [sum(lengths[i] for i in p) for p in receives]
    ids = _all_to_all(out_ids, send_sizes, recv_sizes, torch.long, device)
    logprobs = _all_to_all(out_logprobs, send_sizes, recv_sizes, torch.float32, device)
    positions = [i for p in receives for i in p]
    ids = ids.split([lengths[i] for i in positions])
    logprobs = logprobs.split([lengths[i] for i in positions])
    return {i: (a, b) for i, a, b in zip(positions, ids, logprobs)}


def _all_to_all(pieces: list[torch.Tensor], send_sizes: list[int], recv_sizes: list[int],
                dtype: torch.dtype, device) -> torch.Tensor:
    """all_to_all_single of the concatenated `pieces`; returns what arrived, on the host."""
    send = torch.cat(pieces).to(device) if pieces else torch.zeros(0, dtype=dtype,
                                                                   device=device)
    received = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(received, send, recv_sizes, send_sizes)
    return received.cpu()


def _sampler_logprobs(c: Completion, position: int) -> torch.Tensor:
    """The completion's sampler log-probs, zeros when it has none."""
    n = len(c.completion_ids)
    if not c.logprobs:
        return torch.zeros(n)
    if len(c.logprobs) != n:
        raise ValueError(f"completion {position} (prompt {c.prompt_index}) has "
                         f"{len(c.logprobs)} sampler log-probs for {n} tokens")
    return torch.tensor(c.logprobs, dtype=torch.float32)


def _rebuilt(entry: TableEntry, prompts: list[dict], ids: torch.Tensor,
             logprobs: torch.Tensor) -> Completion:
    """A delivered completion: the prompt's ids from the step's rows, tokens as received."""
    prompt_ids = list(prompts[entry.prompt_index]["prompt_ids"])
    if len(prompt_ids) != entry.prompt_length:
        raise ValueError(f"prompt {entry.prompt_index} has {len(prompt_ids)} tokens here but "
                         f"{entry.prompt_length} in the engine's completion")
    return Completion(entry.prompt_index, prompt_ids, ids.tolist(), "",
                      "length" if entry.truncated else "stop", logprobs.tolist())
