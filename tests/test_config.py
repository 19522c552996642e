"""Strict recipe loading, field validation, and the one translation to TransformerConfig."""

from __future__ import annotations

import pytest
import torch

from openr1_mega.config import (
    ArchConfig,
    Config,
    ModelConfig,
    MoEArch,
    ParallelConfig,
    PrecisionConfig,
    from_dict,
    load_config,
    to_dict,
)
from openr1_mega.config.to_megatron import transformer_config


def _write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_nested_dataclasses(tmp_path):
    path = _write(tmp_path, "model:\n  path: /m\nparallel:\n  tp: 2\n  sequence_parallel: true\n")
    cfg = load_config(path, ["precision.dtype=fp32", "parallel.ep=2", "model.moe_aux_loss_coeff=0"])
    assert cfg.model.path == "/m" and cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel
    assert cfg.precision.dtype == "fp32" and cfg.parallel.ep == 2
    assert cfg.model.moe_aux_loss_coeff == 0.0 and isinstance(cfg.model.moe_aux_loss_coeff, float)
    assert from_dict(Config, to_dict(cfg)) == cfg


@pytest.mark.parametrize("text, override, message", [
    ("parallel:\n  tpp: 2\n", None, r"parallel: unknown key\(s\) \['tpp'\]"),
    ("modle: {}\n", None, r"unknown key\(s\) \['modle'\]"),
    ("", "parallel.tp=two", r"parallel.tp: expected int"),
    ("", "parallel.tp=true", r"parallel.tp: expected int, got a boolean"),
    ("", "parallel.tp=0", r"parallel.tp=0: expected a positive integer"),
    ("", "precision.dtype=fp8", r"precision.dtype='fp8': expected one of"),
    ("", "model.attention_backend=flash", r"model.attention_backend='flash'"),
    ("", "parallel.sequence_parallel=true", r"sequence_parallel=True needs parallel.tp > 1"),
    ("", "bad", r"expected dotted.key=value"),
])
def test_bad_recipes_name_the_key(tmp_path, text, override, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        load_config(path, [override] if override else [])


def test_data_parallel_size_checks_the_world():
    assert ParallelConfig(tp=2, pp=2).data_parallel_size(8) == 2
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp=4"):
        ParallelConfig(tp=2, pp=2).data_parallel_size(6)
    with pytest.raises(ValueError, match="ep\\*etp=4 must divide"):
        ParallelConfig(ep=4).data_parallel_size(2)
    assert ParallelConfig(tp=2, ep=2, etp=1).data_parallel_size(2) == 1


def _moe_arch(norm_topk_prob: bool, shared: int | None) -> ArchConfig:
    moe = MoEArch(num_experts=8, topk=2, ffn_hidden_size=96, norm_topk_prob=norm_topk_prob,
                  layer_pattern=(0, 1, 1), aux_loss_coeff=0.001,
                  shared_expert_ffn_hidden_size=shared, shared_expert_gate=shared is not None)
    return ArchConfig(arch="qwen3_moe", vocab_size=393, hidden_size=128, num_layers=3,
                      num_attention_heads=4, num_kv_heads=2, head_dim=64, ffn_hidden_size=342,
                      norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
                      qkv_bias=False, qk_norm=True, tie_word_embeddings=False, moe=moe)


def test_translation_to_transformer_config():
    tc = transformer_config(_moe_arch(True, None), ParallelConfig(tp=2, ep=2, etp=1),
                            PrecisionConfig(dtype="bf16"), on_cuda=False)
    assert (tc.num_query_groups, tc.kv_channels, tc.qk_layernorm, tc.add_qkv_bias) == \
        (2, 64, True, False)
    assert tc.gated_linear_unit and tc.normalization == "RMSNorm" and not tc.add_bias_linear
    assert tc.params_dtype == torch.bfloat16 and tc.bf16 and tc.use_cpu_initialization
    assert (tc.tensor_model_parallel_size, tc.expert_model_parallel_size,
            tc.expert_tensor_parallel_size) == (2, 2, 1)
    # norm_topk_prob -> softmax over the top-k logits; otherwise softmax then top-k
    assert tc.moe_router_pre_softmax is False and tc.moe_layer_freq == [0, 1, 1]
    assert tc.moe_token_dispatcher_type == "allgather" and tc.moe_aux_loss_coeff == 0.001
    qwen2_moe = transformer_config(_moe_arch(False, 160), ParallelConfig(),
                                   PrecisionConfig(dtype="fp32"), on_cuda=False)
    assert qwen2_moe.moe_router_pre_softmax and qwen2_moe.moe_shared_expert_gate
    assert qwen2_moe.moe_shared_expert_intermediate_size == 160


def test_translation_refuses_what_cpu_or_local_spec_cannot_do():
    arch = _moe_arch(True, None)
    with pytest.raises(ValueError, match="alltoall needs CUDA"):
        transformer_config(arch, ParallelConfig(), PrecisionConfig(),
                           ModelConfig(moe_token_dispatcher="alltoall"), on_cuda=False)
    with pytest.raises(ValueError, match="fp8 needs Transformer Engine"):
        transformer_config(arch, ParallelConfig(), PrecisionConfig(fp8="e4m3"), on_cuda=True)
