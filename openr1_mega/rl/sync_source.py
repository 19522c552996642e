"""The policy's full HF-named tensors on every rank, layer by layer, over tensor collectives.

The weight-sync source for per-rank rollout engines (each rank drives its own TP=1 vLLM
engine, so each rank needs every full tensor). Unlike `checkpoint.gather` (the export
route: everything funnels point-to-point into global rank 0), nothing here goes through
one rank and nothing is pickled:

1. One all-reduce of a tiny int tensor over the pipeline group says which stage owns
   each group of the weight map (embedding, layer 0..L-1, final).
2. Group by group, every rank allocates one flat buffer for the group's full Megatron
   tensors; shapes and dtypes come from the weight map and the ArchConfig
   (`mcore_shape`, the model's `params_dtype`), so no metadata is exchanged.
3. On the owning stage: TP-split tensors are all-gathered inside the tensor-parallel
   group (the expert-TP group for routed experts) straight into their slot of the buffer;
   then the routed experts, which each EP rank holds as one contiguous run of the buffer,
   are all-gathered in place inside the expert-parallel group.
4. The owning stage broadcasts the buffer inside the pipeline group.
5. Every rank cuts the buffer into HF tensors (`to_hf`) and yields them.

Collective contract: every rank of the job iterates the generator to the end, in step.
Memory: one group's buffer at a time, plus one gathered tensor for the TP splits that are
not along dim 0 (linear_proj / linear_fc2 columns, fused gate/up halves). The yielded
tensors are views of that group's buffer (fresh per group, never reused), so consumers
may keep them past the next `next()` without copying.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from openr1_mega.checkpoint.gather import tp_coords
from openr1_mega.checkpoint.hf import param_index
from openr1_mega.models.archs import weight_map
from openr1_mega.models.archs.common import Kind, Rule, mcore_shape, to_hf
from openr1_mega.models.build import model_arch, unwrap


@torch.no_grad()
def iter_hf_tensors_everywhere(model: torch.nn.Module, dtype: torch.dtype | None = None
                               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF hub name, full tensor) on every rank, layer by layer; see the module doc.

    Args:
        model: the (possibly wrapped) Megatron model built by `build_model`.
        dtype: cast every tensor to this dtype (default: the parameter dtype).
    """
    gpt, arch = unwrap(model), model_arch(model)
    params = param_index(model)
    param_dtype = gpt.config.params_dtype
    _check_dtypes(params, param_dtype)
    groups = [(name, tuple(r for r in rules if r.export)) for name, rules in
              weight_map(arch).groups()]
    owners = stage_owners([rules for _, rules in groups], params)
    for (_, rules), owner in zip(groups, owners, strict=True):
        shapes = [mcore_shape(rule, arch, gpt.vocab_size) for rule in rules]
        fulls = _group_everywhere(rules, shapes, params, param_dtype, owner)
        yield from _drain(_hf_named(rules, fulls, arch), dtype)
        del fulls  # the group's buffer must be gone before the next one is allocated


def _drain(named: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None
           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield and forget each (name, tensor), so only the consumer can keep one alive."""
    while named:
        name, tensor = named.pop(0)
        yield name, tensor if dtype is None else tensor.to(dtype)


def _hf_named(rules: tuple[Rule, ...], fulls: list[torch.Tensor], arch
              ) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a group's full Megatron tensors (views where `to_hf` allows)."""
    return [(name, tensor) for rule, full in zip(rules, fulls, strict=True)
            for name, tensor in zip(rule.hf, to_hf(rule, full, arch), strict=True)]


def stage_owners(groups: Sequence[Sequence[Rule]], params: dict[str, torch.Tensor]) -> list[int]:
    """Pipeline rank that holds each group (one int all-reduce over the pipeline group)."""
    owners = torch.full((len(groups),), -1, dtype=torch.int64, device=_device())
    stage = ps.get_pipeline_model_parallel_rank()
    for g, rules in enumerate(groups):
        if any(rule.mcore in params for rule in rules):
            owners[g] = stage
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(owners, op=dist.ReduceOp.MAX,
                        group=ps.get_pipeline_model_parallel_group())
    missing = [g for g, owner in enumerate(owners.tolist()) if owner < 0 and groups[g]]
    if missing:
        raise ValueError(f"no pipeline stage holds weight-map groups {missing} "
                         f"(first rule: {groups[missing[0]][0].mcore})")
    return owners.tolist()


def unshard_into(rule: Rule, gathered: torch.Tensor, out: torch.Tensor) -> None:
    """`out.copy_(unshard(rule, gathered.unbind(0)))` without a full-size temporary.

    `gathered` is [tp size, *shard shape] (an all-gather's output); `out` the full tensor.
    """
    size = gathered.shape[0]
    if rule.kind is Kind.GATE_UP:  # rank r holds [gate_r; up_r]; full = [gate; up]
        halves = gathered.unflatten(1, (2, -1))
        out.view(2, size, *halves.shape[2:]).copy_(halves.transpose(0, 1))
        return
    out.unflatten(rule.tp_dim, (size, -1)).copy_(gathered.movedim(0, rule.tp_dim))


def _group_everywhere(rules: tuple[Rule, ...], shapes: list[tuple[int, ...]],
                      params: dict[str, torch.Tensor], dtype: torch.dtype, owner: int
                      ) -> list[torch.Tensor]:
    """The full Megatron tensors of one group, on every rank (views of one flat buffer)."""
    sizes = [math.prod(shape) for shape in shapes]
    flat = torch.empty(sum(sizes), dtype=dtype, device=_device())
    fulls = [part.view(shape) for part, shape in
             zip(flat.split(sizes), shapes, strict=True)]
    if ps.get_pipeline_model_parallel_rank() == owner:
        for rule, full in zip(rules, fulls, strict=True):
            if rule.mcore in params:
                _gather_tp(rule, params[rule.mcore].detach(), full)
        _gather_experts(rules, sizes, params, flat)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        group = ps.get_pipeline_model_parallel_group()
        dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group)
    return fulls


def _gather_tp(rule: Rule, local: torch.Tensor, out: torch.Tensor) -> None:
    """Write the full tensor of `rule` into `out` from every TP rank's `local` shard."""
    rank, size = tp_coords(rule)
    if rule.tp_dim is None or size == 1:
        out.copy_(local)
        return
    group = (ps.get_expert_tensor_parallel_group() if rule.expert is not None
             else ps.get_tensor_model_parallel_group())
    if rule.tp_dim == 0 and rule.kind is not Kind.GATE_UP:  # shards are contiguous rows
        dist.all_gather_into_tensor(out, local.contiguous(), group=group)
        return
    gathered = local.new_empty(size * local.shape[0], *local.shape[1:])  # gloo: cat form
    dist.all_gather_into_tensor(gathered, local.contiguous(), group=group)
    unshard_into(rule, gathered.view(size, *local.shape), out)


def _gather_experts(rules: tuple[Rule, ...], sizes: list[int],
                    params: dict[str, torch.Tensor], flat: torch.Tensor) -> None:
    """All-gather the routed experts in place: EP rank r holds the r-th run of them."""
    size = ps.get_expert_model_parallel_world_size()
    expert_idx = [i for i, rule in enumerate(rules) if rule.expert is not None]
    if size == 1 or not expert_idx:
        return
    first, last = expert_idx[0], expert_idx[-1]
    if expert_idx != list(range(first, last + 1)):
        raise ValueError(f"routed experts of {rules[first].mcore} are not contiguous in the map")
    rank = ps.get_expert_model_parallel_rank()
    per_rank = len(expert_idx) // size
    mine = [rules[i].mcore in params for i in expert_idx]
    if len(expert_idx) % size or mine != [i // per_rank == rank for i in range(len(mine))]:
        raise ValueError(f"EP rank {rank} of {size} does not hold the contiguous run "
                         f"{rank} of the experts of {rules[first].mcore}")
    start = sum(sizes[:first])
    region = flat[start:start + sum(sizes[first:last + 1])]
    dist.all_gather_into_tensor(region, region.chunk(size)[rank],
                                group=ps.get_expert_model_parallel_group())


def _check_dtypes(params: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Receivers size buffers from `params_dtype`: every parameter must have it."""
    odd = {name: p.dtype for name, p in params.items() if p.dtype != dtype}
    if odd:
        raise ValueError(f"parameters not in params_dtype {dtype}: {odd}")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
