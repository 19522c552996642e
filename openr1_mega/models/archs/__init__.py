"""Supported architectures: HF config -> ArchConfig, and the HF <-> Megatron weight map.

    arch = arch_config("path/to/hf_model")     # or a config.json dict / PretrainedConfig
    wmap = weight_map(arch)                    # rules used by conversion, export, vLLM sync
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from transformers import PretrainedConfig

from openr1_mega.config.schema import ArchConfig
from openr1_mega.models.archs import qwen2, qwen2_moe, qwen3, qwen3_moe
from openr1_mega.models.archs.common import WeightMap
from openr1_mega.models.archs.hf_fields import load_hf_config

ARCHS: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (qwen2, qwen3, qwen2_moe, qwen3_moe)}


def arch_module(model_type: str) -> ModuleType:
    """The archs/<arch>.py module for an HF `model_type`."""
    if model_type not in ARCHS:
        raise NotImplementedError(f"model_type={model_type!r} is not supported; "
                                  f"supported: {sorted(ARCHS)}")
    return ARCHS[model_type]


def arch_config(src: str | Path | dict | PretrainedConfig) -> ArchConfig:
    """ArchConfig for an HF model dir, config.json dict or PretrainedConfig."""
    hf = load_hf_config(src)
    return arch_module(hf.model_type).arch_config(hf)


def weight_map(arch: ArchConfig) -> WeightMap:
    """The HF <-> Megatron weight map of `arch`."""
    return arch_module(arch.arch).weight_map(arch)


__all__ = ["ARCHS", "arch_config", "arch_module", "load_hf_config", "weight_map"]
