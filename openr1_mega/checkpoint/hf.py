"""Hugging Face <-> live Megatron model, through the architecture's weight map.

load_hf_weights(model, hf_dir)   every rank reads, rule by rule, only its TP slice of the
                                 HF tensors of the parameters it holds (`read_shard`),
                                 re-lays it (QKV groups, fused gate/up, padded vocab) and
                                 copies it in; memory: one rule's shard at a time.
iter_hf_tensors(model)           the reverse, for export (weight sync streams through
                                 rl/sync_source.py on every rank instead): yields
                                 (hub name, full tensor) on global rank 0, layer by layer
                                 (collective: all ranks must iterate it; see `gather`).
save_hf(model, out_dir, assets)  iter_hf_tensors -> safetensors shards + config/tokenizer.

Megatron parameter names are made *global* by `param_index` (layer numbers from each
layer's `layer_number`, expert numbers from the MoE layer's `local_expert_indices`, TE's
fused-norm names mapped to the local spec's), so one map serves every TP/PP/EP layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from openr1_mega.checkpoint.gather import gather_groups, tp_coords
from openr1_mega.checkpoint.safetensors_io import HFReader, HFWriter, copy_hf_assets
from openr1_mega.config.schema import ArchConfig
from openr1_mega.models.archs import weight_map
from openr1_mega.models.archs.common import Kind, Rule, hf_shapes, to_hf, to_mcore
from openr1_mega.models.build import model_arch, unwrap

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def param_index(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters under their global, local-spec Megatron names."""
    gpt = unwrap(model)
    out = {}
    for name, param in gpt.named_parameters():
        out[_global_name(gpt, name)] = param
    return out


def _global_name(gpt, name: str) -> str:
    match = _LAYER.match(name)
    if not match:
        return name
    layer = gpt.decoder.layers[int(match.group(1))]
    rest = name[match.end():]
    for te_name, local_name in _TE_ALIASES.items():
        if rest == te_name:
            rest = local_name
    expert = _EXPERT.search("." + rest)
    if expert:
        global_e = layer.mlp.local_expert_indices[int(expert.group(1))]
        rest = rest.replace(f"local_experts.{expert.group(1)}.", f"local_experts.{global_e}.", 1)
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path) -> int:
    """Copy an HF checkpoint's weights into this rank's shard of `model` (no collectives).

    Each rank reads only the bytes of its own TP shard (`read_shard`). Raises ValueError if
    a tensor has an unexpected shape or if any parameter of the model is left unset (so a
    wrong map cannot leave random weights behind silently). Returns the tensor bytes read.
    """
    gpt, arch = unwrap(model), model_arch(model)
    params, reader, loaded = param_index(model), HFReader(hf_dir), set()
    for rule in weight_map(arch).rules():
        param = params.get(rule.mcore)
        if param is None:
            continue
        for name, want in zip(rule.hf, hf_shapes(rule, arch), strict=True):
            if reader.shape(name) != want:
                raise ValueError(f"{hf_dir}: {name} has shape {reader.shape(name)}, "
                                 f"expected {want}")
        local = read_shard(reader, rule, arch, gpt.vocab_size, *tp_coords(rule))
        if local.shape != param.shape:
            raise ValueError(f"{rule.mcore}: shard shape {tuple(local.shape)} != parameter "
                             f"shape {tuple(param.shape)}")
        param.copy_(local)
        loaded.add(rule.mcore)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"parameters not covered by the {arch.arch} weight map: {missing}")
    return reader.bytes_read


def read_shard(reader: HFReader, rule: Rule, arch: ArchConfig, padded_vocab: int,
               rank: int, size: int) -> torch.Tensor:
    """`shard(rule, to_mcore(rule, <HF tensors>), rank, size)`, reading only that shard.

    Every TP split of a Megatron tensor is a slice of each HF tensor it is made of:
    COPY along `tp_dim`; GATE_UP the rank's rows of gate and of up; VOCAB the rank's rows
    of the padded table (the rows past the real vocabulary are zeros, never read); QKV
    whole KV groups, i.e. the rank's rows of q, of k and of v.
    """
    if rule.tp_dim is None or size == 1:
        return to_mcore(rule, [reader.get(n) for n in rule.hf], arch, padded_vocab)
    if rule.kind is Kind.COPY:
        return _read_chunk(reader, rule.hf[0], rule.tp_dim, rank, size)
    if rule.kind is Kind.GATE_UP:
        return torch.cat([_read_chunk(reader, n, 0, rank, size) for n in rule.hf])
    if rule.kind is Kind.VOCAB:
        rows, vocab = padded_vocab // size, reader.shape(rule.hf[0])[0]
        start = rank * rows
        table = reader.get_slice(rule.hf[0], 0, min(start, vocab), min(start + rows, vocab))
        return torch.cat([table, table.new_zeros(rows - table.shape[0], *table.shape[1:])])
    if arch.num_kv_heads % size:
        raise ValueError(f"{rule.mcore}: {arch.num_kv_heads} KV groups do not split over "
                         f"{size} tensor-parallel ranks")
    q, k, v = (_read_chunk(reader, n, 0, rank, size) for n in rule.hf)
    groups, d, rest = arch.num_kv_heads // size, arch.head_dim, q.shape[1:]
    parts = (q.reshape(groups, -1, *rest), k.reshape(groups, d, *rest),
             v.reshape(groups, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _read_chunk(reader: HFReader, name: str, dim: int, rank: int, size: int) -> torch.Tensor:
    """`reader.get(name).chunk(size, dim)[rank]`, reading only that chunk."""
    n = reader.shape(name)[dim]
    step = -(-n // size)  # torch.chunk's chunk length
    start = min(rank * step, n)
    return reader.get_slice(name, dim, start, min(start + step, n))


@torch.no_grad()
def iter_hf_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF hub name, full tensor) on global rank 0; other ranks yield nothing.

    Collective: every rank of the job must iterate this generator to the end, in step.
    Tensors are un-fused (q/k/v, gate/up), un-padded (vocab) and per expert (MoE), in the
    hub's on-disk naming. They live on the gathering device (GPU under NCCL) and are views
    of a per-layer receive buffer or, for what rank 0 holds itself, of the live parameters:
    copy them if they must outlive the next optimizer step.

    Args:
        model: the (possibly wrapped) Megatron model built by `build_model`.
        dtype: cast every tensor to this dtype (default: keep the parameter dtype).
    """
    arch = model_arch(model)
    for _, full_tensors in gather_groups(weight_map(arch), param_index(model)):
        for rule, full in full_tensors:
            for name, tensor in zip(rule.hf, to_hf(rule, full, arch), strict=True):
                yield name, tensor if dtype is None else tensor.to(dtype)


def export_plan(arch: ArchConfig, dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype]]:
    """(HF name, shape, dtype) of every exported tensor, in the order they are produced."""
    return [(name, shape, dtype) for rule in weight_map(arch).rules() if rule.export
            for name, shape in zip(rule.hf, hf_shapes(rule, arch), strict=True)]


def save_hf(model: torch.nn.Module, out_dir: str | Path, assets_dir: str | Path | None = None,
            *, dtype: torch.dtype | None = None, max_shard_bytes: int = 2 << 30) -> None:
    """Export a live model as an HF checkpoint (collective; rank 0 writes `out_dir`).

    `assets_dir` (config.json, tokenizer files) is copied alongside when given.
    """
    writer = None
    if dist.get_rank() == 0:
        plan = export_plan(model_arch(model), dtype or unwrap(model).config.params_dtype)
        writer = HFWriter(out_dir, plan, max_shard_bytes)
    for name, tensor in iter_hf_tensors(model, dtype):
        writer.add(name, tensor)
    if writer is not None:
        writer.close()
        if assets_dir is not None:
            copy_hf_assets(assets_dir, out_dir)
