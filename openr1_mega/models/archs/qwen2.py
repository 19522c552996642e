"""Qwen2 / Qwen2.5 (dense): q/k/v bias, RMSNorm, SwiGLU, RoPE, GQA, tied or untied head."""

from __future__ import annotations

from transformers import PretrainedConfig

from openr1_mega.config.schema import ArchConfig
from openr1_mega.models.archs import common
from openr1_mega.models.archs.hf_fields import common_fields

MODEL_TYPE = "qwen2"


def arch_config(hf: PretrainedConfig) -> ArchConfig:
    """ArchConfig of a Qwen2 config (head_dim is hidden/heads, as vLLM assumes)."""
    return ArchConfig(arch=MODEL_TYPE, qkv_bias=True, qk_norm=False, **common_fields(hf))


def weight_map(arch: ArchConfig) -> common.WeightMap:
    """Embedding; per layer attention (+q/k/v bias) and SwiGLU MLP; final norm and head."""
    layers = tuple(common.attention_rules(i, arch) + common.dense_mlp_rules(i)
                   for i in range(arch.num_layers))
    return common.WeightMap(arch, common.embedding_rules(), layers, common.final_rules(arch))
