"""Gather full Megatron tensors from a model sharded over TP/PP/EP onto global rank 0.

Collective contract: every rank calls `gather_groups` and iterates it to the end. Rank 0
receives; on the other ranks the generator yields nothing (it only sends).

Algorithm:
1. Each rank lists what it holds for every exported rule of the weight map: its TP
   coordinate (expert-TP for routed experts), shape and dtype. Only one replica sends:
   the data-parallel(+CP) rank 0 for dense parameters, the expert-data-parallel rank 0
   for experts, and TP coordinate 0 for TP-replicated tensors (norms, router).
2. One `all_gather_object` of those lists tells rank 0 who sends what.
3. Group by group (embedding, layer 0..L-1, final): each sender packs its shards of the
   group into one byte buffer and sends it to rank 0; rank 0 receives in ascending source
   order, unpacks, joins TP shards (`archs.common.unshard`) and yields the group. Every
   rank walks the groups in the same order, so the point-to-point pairs cannot deadlock,
   and rank 0 holds one group at a time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from openr1_mega.models.archs.common import Rule, WeightMap, unshard

Entry = tuple[int, int, tuple[int, ...], torch.dtype]  # rule index, tp coordinate, shape, dtype


def tp_coords(rule: Rule) -> tuple[int, int]:
    """(rank, size) of the tensor-parallel group that splits `rule`'s tensor."""
    if rule.expert is not None:
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def gather_groups(wmap: WeightMap, params: dict[str, torch.Tensor]
                  ) -> Iterator[tuple[str, list[tuple[Rule, torch.Tensor]]]]:
    """Yield (group name, [(rule, full Megatron tensor)]) on rank 0; see the module doc."""
    groups = [(name, rules) for name, rules in wmap.groups()]
    indexed = [(g, i, rule) for g, (_, rules) in enumerate(groups) for i, rule in
               enumerate(rules) if rule.export]
    mine = [(g, i, _tp_index(rule)) for g, i, rule in indexed
            if rule.mcore in params and _is_sender(rule)]
    table = [((g, i), tp, tuple(params[groups[g][1][i].mcore].shape),
              params[groups[g][1][i].mcore].dtype) for g, i, tp in mine]
    tables = [None] * dist.get_world_size()
    dist.all_gather_object(tables, table)
    me = dist.get_rank()
    for g, (name, rules) in enumerate(groups):
        local = [params[rules[i].mcore].detach() for (gg, i), *_ in table if gg == g]
        if me != 0:
            if local:
                dist.send(_pack(local), dst=0)
            continue
        yield name, _receive_group(g, rules, tables, local)


def _receive_group(g: int, rules: tuple[Rule, ...], tables: list, local: list[torch.Tensor]
                   ) -> list[tuple[Rule, torch.Tensor]]:
    shards: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
    device = local[0].device if local else _device()
    for src, table in enumerate(tables):
        entries = [(i, tp, shape, dtype) for (gg, i), tp, shape, dtype in table if gg == g]
        if not entries:
            continue
        tensors = local if src == 0 else _unpack(_recv(entries, src, device), entries)
        for (i, tp, _, _), tensor in zip(entries, tensors, strict=True):
            shards[i][tp] = tensor
    return [(rules[i], unshard(rules[i], [parts[k] for k in sorted(parts)]))
            for i, parts in sorted(shards.items())]


def _is_sender(rule: Rule) -> bool:
    if rule.expert is not None:
        replica = ps.get_expert_data_parallel_rank()
    else:
        replica = ps.get_data_parallel_rank(with_context_parallel=True)
    return replica == 0 and (rule.tp_dim is not None or tp_coords(rule)[0] == 0)


def _tp_index(rule: Rule) -> int:
    return tp_coords(rule)[0] if rule.tp_dim is not None else 0


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def _recv(entries: list, src: int, device) -> torch.Tensor:
    nbytes = sum(torch.Size(shape).numel() * _itemsize(dtype) for _, _, shape, dtype in entries)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dist.recv(buf, src=src)
    return buf


def _unpack(buf: torch.Tensor, entries: list) -> list[torch.Tensor]:
    out, offset = [], 0
    for _, _, shape, dtype in entries:
        n = torch.Size(shape).numel() * _itemsize(dtype)
        out.append(buf[offset:offset + n].view(dtype).reshape(shape))
        offset += n
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
