"""Qwen2-MoE: routed experts (softmax, top-k) plus a shared expert scaled by a sigmoid gate."""

from __future__ import annotations

from transformers import PretrainedConfig

from openr1_mega.config.schema import ArchConfig, MoEArch
from openr1_mega.models.archs import common
from openr1_mega.models.archs.hf_fields import common_fields, moe_fields

MODEL_TYPE = "qwen2_moe"


def arch_config(hf: PretrainedConfig) -> ArchConfig:
    """ArchConfig of a Qwen2-MoE config; dense layers (mlp_only_layers) use intermediate_size."""
    moe = MoEArch(
        **moe_fields(hf),
        shared_expert_ffn_hidden_size=hf.shared_expert_intermediate_size,
        shared_expert_gate=True,
    )
    return ArchConfig(arch=MODEL_TYPE, qkv_bias=bool(getattr(hf, "qkv_bias", True)),
                      qk_norm=False, moe=moe, **common_fields(hf))


def weight_map(arch: ArchConfig) -> common.WeightMap:
    """Per MoE layer: router, routed experts, shared expert and its gate."""
    layers = tuple(
        common.attention_rules(i, arch) + (
            common.routed_expert_rules(i, arch) + common.shared_expert_rules(i)
            if arch.is_moe_layer(i) else common.dense_mlp_rules(i))
        for i in range(arch.num_layers))
    return common.WeightMap(arch, common.embedding_rules(), layers, common.final_rules(arch))
