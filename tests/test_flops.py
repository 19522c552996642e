"""FLOPs from the architecture against hand counts, real parameter counts and 6*N*T.

The hand counts below are written term by term (MACs of each matmul, x2 for FLOPs), not
through utils.flops, so a wrong formula cannot agree with itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openr1_mega.models.archs import arch_config
from openr1_mega.utils.flops import forward_flops, matmul_params, train_step_flops
from openr1_mega.utils.peak import gpu_spec, machine_peak, measure_matmul_tflops, perf_metrics

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
_TINY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=1000, max_position_embeddings=512,
             tie_word_embeddings=False)


def test_dense_forward_and_step_match_a_hand_count():
    """Qwen3: h=128, a=4 heads, g=2 KV heads, d=64, f=342, L=2, V=1000; sequences of 5 and 3."""
    arch = arch_config(dict(_TINY, model_type="qwen3", head_dim=64, intermediate_size=342))
    tokens, layers = 5 + 3, 2
    # Q [128->256], K [128->128], V [128->128], O [256->128], per token per layer.
    proj = 2 * (128 * 256 + 128 * 128 + 128 * 128 + 256 * 128) * tokens * layers
    # Causal key positions: 5*6/2 + 3*4/2 = 21 query-key pairs; per pair and head a
    # 64-long dot product (QK^T) and a 64-wide weighted sum (AV).
    core = 2 * (64 + 64) * 4 * 21 * layers
    mlp = 2 * (128 * 342 + 128 * 342 + 342 * 128) * tokens * layers   # gate, up, down
    head = 2 * 128 * 1000 * tokens
    fwd = forward_flops(arch, [5, 3])
    assert (fwd.attention_proj, fwd.attention_core, fwd.mlp, fwd.moe, fwd.lm_head) == (
        proj, core, mlp, 0, head)
    total = proj + core + mlp + head
    assert train_step_flops(arch, [5, 3]) == 3 * total
    assert train_step_flops(arch, [5, 3], "selective") == 3 * total + core
    assert train_step_flops(arch, [5, 3], "full") == 4 * total


def test_moe_forward_matches_a_hand_count():
    """Qwen2-MoE with shared expert + gate; layer 0 dense (mlp_only_layers), layer 1 MoE."""
    arch = arch_config(dict(_TINY, model_type="qwen2_moe", intermediate_size=342,
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96,
                            shared_expert_intermediate_size=160, mlp_only_layers=[0]))
    tokens = 7
    # d = 128 / 4 = 32: Q [128->128], K and V [128->64], O [128->128].
    proj = 2 * (128 * 128 + 128 * 64 + 128 * 64 + 128 * 128) * tokens * 2
    core = 2 * (32 + 32) * 4 * (7 * 8 // 2) * 2
    dense = 2 * 3 * 128 * 342 * tokens                    # layer 0 only
    router = 128 * 4
    experts = 2 * (3 * 128 * 96)                          # top-2 of 4 experts
    shared = 3 * 128 * 160 + 128                          # shared expert + its sigmoid gate
    moe = 2 * (router + experts + shared) * tokens        # layer 1 only
    fwd = forward_flops(arch, [7])
    assert (fwd.attention_proj, fwd.attention_core, fwd.mlp, fwd.moe) == (proj, core, dense, moe)
    assert fwd.lm_head == 2 * 128 * 1000 * tokens


def _hf_matmul_numel(hf_dict: dict) -> int:
    """Weights of a real transformers model (built on the meta device) that enter matmuls."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(hf_dict)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = ("embed_tokens", "norm", "bias")
    return sum(p.numel() for n, p in model.named_parameters() if not any(s in n for s in skip))


@pytest.mark.parametrize("hf_dict", [
    dict(_TINY, model_type="qwen3", head_dim=64, intermediate_size=342),
    dict(_TINY, model_type="qwen2_moe", intermediate_size=342, num_experts=4,
         num_experts_per_tok=2, moe_intermediate_size=96, shared_expert_intermediate_size=160),
], ids=["qwen3", "qwen2_moe"])
def test_matmul_params_equal_a_real_model(hf_dict):
    assert matmul_params(arch_config(hf_dict), active=False) == _hf_matmul_numel(hf_dict)


def test_six_n_t_holds_up_to_the_attention_share():
    """Qwen2.5-7B at 512 tokens: step FLOPs = 6 * N * T + 3 * attention-core FLOPs, where N
    is the real model's parameter count without the embedding (biases and norms only
    blur it by < 0.1%); the gap to 6NT is the attention share and nothing else."""
    hf = __import__("json").loads((RECIPES / "qwen2.5_7b" / "config.json").read_text())
    arch = arch_config(hf)
    seqs = [512] * 4
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(data.pop("model_type"),
                                                                      **data))
    n_non_embedding = sum(p.numel() for n, p in model.named_parameters()
                          if "embed_tokens" not in n)
    flops = train_step_flops(arch, seqs)
    six_nt = 6 * n_non_embedding * sum(seqs)
    attention_share = 3 * forward_flops(arch, seqs).attention_core / flops
    assert 0 < attention_share < 0.05
    assert abs((flops - six_nt) / flops - attention_share) < 1e-3
    assert flops == 6 * matmul_params(arch) * sum(seqs) + 3 * forward_flops(
        arch, seqs).attention_core


def test_packed_rows_count_each_document():
    """One 8-token row packing documents of 5 and 3 costs less attention than 8 tokens."""
    arch = arch_config(dict(_TINY, model_type="qwen3", head_dim=64, intermediate_size=342))
    packed, single = forward_flops(arch, [5, 3]), forward_flops(arch, [8])
    assert packed.attention_core < single.attention_core
    assert packed.attention_proj == single.attention_proj and packed.mlp == single.mlp


def test_perf_metrics_and_peaks():
    assert perf_metrics(4e12, 2.0, 4.0, num_devices=1) == {"perf/tflops": 2.0, "perf/mfu": 0.5}
    assert perf_metrics(8e12, 1.0, 2.0, num_devices=4)["perf/mfu"] == 1.0
    with pytest.raises(ValueError, match="seconds"):
        perf_metrics(1.0, 0.0, 1.0)
    assert gpu_spec("NVIDIA H100 80GB HBM3").bf16_tflops == 989.0
    assert gpu_spec("NVIDIA H200").hbm_tb_s == 4.8
    assert gpu_spec("NVIDIA A100-SXM4-80GB").bf16_tflops == 312.0
    assert gpu_spec("Tesla T4") is None


def test_measured_peak_on_this_cpu():
    """No GPU here: MFU divides by this CPU's own measured matmul rate."""
    assert measure_matmul_tflops(torch.float32, size=256, repeats=2) > 0
    peak = machine_peak("fp32", device="cpu")
    assert peak.tflops > 0 and peak.source.startswith("measured cpu fp32")


def test_llama3_70b_flops_per_token_equal_megatron_bridge_published():
    """Megatron-Bridge publishes Llama3-70B at seq 8192 on H100: 719 model TFLOP/s/GPU at
    1,602 tokens/s/GPU, i.e. 4.488e11 FLOPs per token. Ours agree within the rounding of
    those two published figures (0.1%)."""
    import yaml

    from openr1_mega.config.schema import ArchConfig

    runs = yaml.safe_load((RECIPES.parents[1] / "tools" / "plan_validation.yaml").read_text())
    llama = ArchConfig(**next(r for r in runs["runs"] if "Llama3-70B" in r["name"])["hf_config"])
    ours = train_step_flops(llama, [8192]) / 8192
    assert ours == pytest.approx(719e12 / 1602, rel=2e-3)
