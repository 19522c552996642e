"""Reading the fields every supported architecture shares out of a Hugging Face config.

`load_hf_config` accepts a model directory, a config.json dict or a `PretrainedConfig`
and returns transformers' normalised config object (so hub files in older layouts, such
as a top-level `rope_theta`, read the same as new ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig


def load_hf_config(src: str | Path | dict | PretrainedConfig) -> PretrainedConfig:
    """transformers' config object for a model dir, a config.json dict or a config."""
    if isinstance(src, PretrainedConfig):
        return src
    if isinstance(src, dict):
        data = dict(src)
        if "model_type" not in data:
            raise ValueError("hf config dict: missing 'model_type'")
        return AutoConfig.for_model(data.pop("model_type"), **data)
    path = Path(src)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model dir)")
    return AutoConfig.from_pretrained(str(path))


def common_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """ArchConfig fields shared by Qwen2/Qwen3 dense and MoE configs."""
    _check_supported(hf)
    heads = hf.num_attention_heads
    return dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=hf.num_key_value_heads or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        ffn_hidden_size=hf.intermediate_size,
        norm_eps=hf.rms_norm_eps,
        rope_theta=float(_rope(hf)["rope_theta"]),
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        hf_config=hf.to_dict(),
    )


def moe_layer_pattern(hf: PretrainedConfig) -> tuple[int, ...]:
    """1 for layers with routed experts, 0 for dense ones, as HF's decoder layer decides."""
    only_mlp = set(getattr(hf, "mlp_only_layers", None) or [])
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    return tuple(int(i not in only_mlp and (i + 1) % step == 0)
                 for i in range(hf.num_hidden_layers))


def _rope(hf: PretrainedConfig) -> dict:
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": getattr(hf, "rope_theta",
                                                                          10000.0)}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise NotImplementedError(f"{hf.model_type}: rope_type={kind!r} is not supported "
                                  "(only plain RoPE)")
    return rope


def _check_supported(hf: PretrainedConfig) -> None:
    if getattr(hf, "use_sliding_window", False):
        raise NotImplementedError(f"{hf.model_type}: use_sliding_window=True is not supported")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"{hf.model_type}: hidden_act={hf.hidden_act!r} (need silu)")


def moe_fields(hf: PretrainedConfig) -> dict:
    """The MoEArch fields that Qwen2-MoE and Qwen3-MoE configs spell alike."""
    return dict(num_experts=hf.num_experts, topk=hf.num_experts_per_tok,
                ffn_hidden_size=hf.moe_intermediate_size,
                norm_topk_prob=bool(hf.norm_topk_prob), layer_pattern=moe_layer_pattern(hf),
                aux_loss_coeff=float(hf.router_aux_loss_coef))
