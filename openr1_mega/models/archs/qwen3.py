"""Qwen3 (dense): per-head q/k RMSNorm before RoPE, no q/k/v bias, explicit head_dim."""

from __future__ import annotations

from transformers import PretrainedConfig

from openr1_mega.config.schema import ArchConfig
from openr1_mega.models.archs import common
from openr1_mega.models.archs.hf_fields import common_fields

MODEL_TYPE = "qwen3"


def arch_config(hf: PretrainedConfig) -> ArchConfig:
    """ArchConfig of a Qwen3 config (`attention_bias` adds q/k/v bias when set)."""
    return ArchConfig(arch=MODEL_TYPE, qkv_bias=bool(getattr(hf, "attention_bias", False)),
                      qk_norm=True, **common_fields(hf))


def weight_map(arch: ArchConfig) -> common.WeightMap:
    """Embedding; per layer attention (+q/k norms) and SwiGLU MLP; final norm and head."""
    layers = tuple(common.attention_rules(i, arch) + common.dense_mlp_rules(i)
                   for i in range(arch.num_layers))
    return common.WeightMap(arch, common.embedding_rules(), layers, common.final_rules(arch))
