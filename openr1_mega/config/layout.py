"""Whether a parallel layout can split an architecture, checked without Megatron or torch.

`stage_layers(num_layers, parallel)` gives the layer count of every pipeline stage by
Megatron-Core's own rule (`transformer_block.get_num_layers_to_build` and
`transformer_layer.get_transformer_layer_offset`, 0.16.1, no virtual stages):
  - the first / last stage take `parallel.pp_first_stage_layers` /
    `parallel.pp_last_stage_layers` when set;
  - the remaining layers split evenly over the remaining (middle) stages; with neither
    field set that is every stage, so `num_layers` must be divisible by `pp`.
`stage_offsets` are the global index of each stage's first layer. `check_layout` raises a
ValueError naming the recipe fields when `parallel` cannot split `arch`; it runs when a
recipe is loaded (config.validate) and again when a model is built (models.build).
"""

from __future__ import annotations

from openr1_mega.config.schema import ArchConfig, ParallelConfig


def stage_layers(num_layers: int, parallel: ParallelConfig) -> list[int]:
    """Layers of each pipeline stage (length `parallel.pp`), as Megatron builds them."""
    pp, first, last = parallel.pp, parallel.pp_first_stage_layers, parallel.pp_last_stage_layers
    if not parallel.uneven_pipeline:
        if num_layers % pp:
            raise ValueError(
                f"arch.num_layers={num_layers} is not divisible by parallel.pp={pp}; set "
                "parallel.pp_first_stage_layers / parallel.pp_last_stage_layers for an uneven "
                "split")
        return [num_layers // pp] * pp
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    fields = _uneven_fields(parallel)
    if middle_layers < 0 or (middle_stages == 0) != (middle_layers == 0):
        raise ValueError(f"{fields} leave {middle_layers} of arch.num_layers={num_layers} for "
                         f"{middle_stages} middle stage(s) of parallel.pp={pp}")
    if middle_stages and middle_layers % middle_stages:
        raise ValueError(f"{fields} leave {middle_layers} of arch.num_layers={num_layers}, "
                         f"not divisible by the {middle_stages} middle stage(s) of "
                         f"parallel.pp={pp}")
    each = middle_layers // middle_stages if middle_stages else 0
    counts = [each] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def stage_offsets(num_layers: int, parallel: ParallelConfig) -> list[int]:
    """Global index of the first layer of each pipeline stage."""
    counts = stage_layers(num_layers, parallel)
    return [sum(counts[:i]) for i in range(len(counts))]


def check_layout(arch: ArchConfig, parallel: ParallelConfig) -> None:
    """Raise ValueError naming the fields when `parallel` cannot split `arch`."""
    tp, etp = parallel.tp, parallel.expert_tp
    checks = [
        ("arch.num_attention_heads", arch.num_attention_heads, "parallel.tp", tp),
        ("arch.num_kv_heads", arch.num_kv_heads, "parallel.tp", tp),
        ("arch.ffn_hidden_size", arch.ffn_hidden_size, "parallel.tp", tp),
    ]
    if arch.moe:
        checks += [("moe.num_experts", arch.moe.num_experts, "parallel.ep", parallel.ep),
                   ("moe.ffn_hidden_size", arch.moe.ffn_hidden_size, "parallel.etp", etp)]
        if arch.moe.shared_expert_ffn_hidden_size:
            checks.append(("moe.shared_expert_ffn_hidden_size",
                           arch.moe.shared_expert_ffn_hidden_size, "parallel.tp", tp))
    elif parallel.ep > 1:
        raise ValueError(f"parallel.ep={parallel.ep} needs a MoE model ({arch.arch} is dense)")
    for name, value, by_name, by in checks:
        if value % by:
            raise ValueError(f"{name}={value} is not divisible by {by_name}={by}")
    stage_layers(arch.num_layers, parallel)


def _uneven_fields(parallel: ParallelConfig) -> str:
    names = [f"parallel.{n}={getattr(parallel, n)}" for n in
             ("pp_first_stage_layers", "pp_last_stage_layers") if getattr(parallel, n) is not None]
    return " and ".join(names)
