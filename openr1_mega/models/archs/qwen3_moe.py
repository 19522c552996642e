"""Qwen3-MoE: routed experts only (top-k, probabilities renormalised when norm_topk_prob)."""

from __future__ import annotations

from transformers import PretrainedConfig

from openr1_mega.config.schema import ArchConfig, MoEArch
from openr1_mega.models.archs import common
from openr1_mega.models.archs.hf_fields import common_fields, moe_fields

MODEL_TYPE = "qwen3_moe"


def arch_config(hf: PretrainedConfig) -> ArchConfig:
    """ArchConfig of a Qwen3-MoE config (q/k norms as Qwen3, no shared expert)."""
    moe = MoEArch(
        **moe_fields(hf),
    )
    return ArchConfig(arch=MODEL_TYPE, qkv_bias=bool(getattr(hf, "attention_bias", False)),
                      qk_norm=True, moe=moe, **common_fields(hf))


def weight_map(arch: ArchConfig) -> common.WeightMap:
    """Per MoE layer: router and routed experts; dense layers (mlp_only_layers) as Qwen3."""
    layers = tuple(
        common.attention_rules(i, arch) + (
            common.routed_expert_rules(i, arch) if arch.is_moe_layer(i)
            else common.dense_mlp_rules(i))
        for i in range(arch.num_layers))
    return common.WeightMap(arch, common.embedding_rules(), layers, common.final_rules(arch))
