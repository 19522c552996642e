"""The weight-name maps and layout transforms, checked without building Megatron models."""

from __future__ import annotations

import pytest
import torch

from openr1_mega.config.schema import ParallelConfig
from openr1_mega.models.archs import arch_config, weight_map
from openr1_mega.models.archs.common import (
    Kind,
    Rule,
    hf_shapes,
    shard,
    to_hf,
    to_mcore,
    unshard,
)
from openr1_mega.models.archs.hf_fields import moe_layer_pattern
from openr1_mega.models.build import validate_layout
from tests._mcore_helpers import ARCHS, hf_tensors, tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {(a, t): tiny(root, a, t) for a in ARCHS for t in (False, True)}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_map_covers_every_hub_tensor_once(models, arch, tied):
    hf_dir = models[arch, tied]
    cfg = arch_config(hf_dir)
    on_disk = {k: v.shape for k, v in hf_tensors(hf_dir).items()}
    exported = [(n, s) for r in weight_map(cfg).rules() if r.export
                for n, s in zip(r.hf, hf_shapes(r, cfg))]
    names = [n for n, _ in exported]
    assert len(names) == len(set(names)), "an HF tensor is produced twice"
    assert set(names) == set(on_disk)
    assert all(on_disk[n] == s for n, s in exported)
    assert cfg.tie_word_embeddings == tied and cfg.arch == arch


def test_arch_fields_from_hf(models):
    qwen3 = arch_config(models["qwen3", False])
    assert (qwen3.head_dim, qwen3.hidden_size, qwen3.qk_norm, qwen3.qkv_bias) == (64, 128, True,
                                                                                  False)
    q2moe = arch_config(models["qwen2_moe", False])
    assert q2moe.qkv_bias and q2moe.moe.shared_expert_gate and not q2moe.moe.norm_topk_prob
    assert q2moe.moe.shared_expert_ffn_hidden_size == 160
    assert arch_config(models["qwen3_moe", False]).moe.norm_topk_prob


def _qkv_reference(q, k, v, groups):
    """Megatron's grouped QKV rows built head by head: per group its q heads, k, v."""
    heads_per_group = q.shape[0] // k.shape[0]
    d = k.shape[0] // groups
    rows = []
    for g in range(groups):
        for h in range(heads_per_group):
            head = g * heads_per_group + h
            rows.append(q[head * d:(head + 1) * d])
        rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    return torch.cat(rows)


@pytest.mark.parametrize("bias", [False, True])
def test_qkv_layout_matches_head_by_head_reference(bias):
    from openr1_mega.config.schema import ArchConfig

    arch = ArchConfig(arch="qwen2", vocab_size=11, hidden_size=7, num_layers=1,
                      num_attention_heads=6, num_kv_heads=3, head_dim=5, ffn_hidden_size=9,
                      norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=16, qkv_bias=True,
                      qk_norm=False, tie_word_embeddings=False)
    tail = () if bias else (7,)
    q, k, v = torch.randn(30, *tail), torch.randn(15, *tail), torch.randn(15, *tail)
    rule = Rule("x", ("q", "k", "v"), Kind.QKV, 0)
    fused = to_mcore(rule, [q, k, v], arch, 11)
    assert torch.equal(fused, _qkv_reference(q, k, v, groups=3))
    assert all(torch.equal(a, b) for a, b in zip(to_hf(rule, fused, arch), (q, k, v)))
    # TP=3 gives each rank one whole group: its heads' q, then k, then v
    per_rank = [shard(rule, fused, r, 3) for r in range(3)]
    assert torch.equal(per_rank[1], _qkv_reference(q[10:20], k[5:10], v[5:10], groups=1))
    assert torch.equal(unshard(rule, per_rank), fused)


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_gate_up_shards_hold_matching_halves(tp):
    gate, up = torch.randn(6 * tp, 5), torch.randn(6 * tp, 5)
    rule = Rule("fc1", ("g", "u"), Kind.GATE_UP, 0)
    fused = to_mcore(rule, [gate, up], None, 0)
    parts = [shard(rule, fused, r, tp) for r in range(tp)]
    for r, part in enumerate(parts):
        assert torch.equal(part, torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
    assert torch.equal(unshard(rule, parts), fused)
    assert all(torch.equal(a, b) for a, b in zip(to_hf(rule, fused, None), (gate, up)))


def test_vocab_padding_is_zero_and_removed_on_export(models):
    arch = arch_config(models["qwen2", False])
    assert (arch.vocab_size, arch.padded_vocab_size(1), arch.padded_vocab_size(2),
            arch.padded_vocab_size(3)) == (393, 512, 512, 768)
    rule = Rule("embedding.word_embeddings.weight", ("e",), Kind.VOCAB, 0)
    emb = torch.randn(393, 256)
    padded = to_mcore(rule, [emb], arch, 768)
    assert padded.shape == (768, 256) and not padded[393:].any()
    assert torch.equal(to_hf(rule, padded, arch)[0], emb)
    assert torch.equal(unshard(rule, [shard(rule, padded, r, 3) for r in range(3)]), padded)


def test_row_parallel_split_is_along_columns():
    rule = Rule("proj", ("o",), Kind.COPY, 1)
    w = torch.randn(4, 6)
    assert torch.equal(shard(rule, w, 1, 2), w[:, 3:])
    assert torch.equal(shard(Rule("n", ("n",), Kind.COPY, None), w, 1, 2), w)


def test_moe_layer_pattern_follows_hf_decoder_rule():
    from transformers import Qwen2MoeConfig

    hf = Qwen2MoeConfig(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    assert moe_layer_pattern(hf) == (0, 1, 0, 0, 0, 1)


def test_layout_validation_names_the_field(models):
    qwen2 = arch_config(models["qwen2", False])
    moe = arch_config(models["qwen3_moe", False])
    with pytest.raises(ValueError, match="num_kv_heads=2 is not divisible by parallel.tp=4"):
        validate_layout(qwen2, ParallelConfig(tp=4))
    with pytest.raises(ValueError, match="num_layers=2 is not divisible by parallel.pp=3"):
        validate_layout(qwen2, ParallelConfig(pp=3))
    with pytest.raises(ValueError, match="num_experts=8 is not divisible by parallel.ep=3"):
        validate_layout(moe, ParallelConfig(ep=3))
    with pytest.raises(ValueError, match="needs a MoE model"):
        validate_layout(qwen2, ParallelConfig(ep=2))
    validate_layout(moe, ParallelConfig(tp=2, ep=2, etp=1))


def test_unsupported_configs_are_refused():
    with pytest.raises(NotImplementedError, match="llama"):
        arch_config({"model_type": "llama"})
    with pytest.raises(NotImplementedError, match="rope_type"):
        arch_config({"model_type": "qwen2", "rope_parameters": {"rope_type": "yarn",
                                                                 "rope_theta": 1e6,
                                                                 "factor": 4.0}})
    with pytest.raises(NotImplementedError, match="sliding"):
        arch_config({"model_type": "qwen2", "use_sliding_window": True})
