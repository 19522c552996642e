"""Model FLOPs of a training step, counted from the architecture (no profiler involved).

Convention (Megatron-LM / PaLM "model FLOPs"): a multiply-accumulate is 2 FLOPs, a
backward pass costs twice its forward, norms/activations/softmax are not counted, and
recomputation is counted on top (so `perf/mfu` of a run that recomputes reads as
hardware FLOPs, which is what Megatron's throughput log reports too).

Forward FLOPs of one token, per layer (h hidden, a query heads, g key/value heads,
d head dim, f dense FFN size, E experts, k top-k, fe expert FFN size, fs shared FFN):
  attention projections   2 * h * d * (2a + 2g)          (Q, K, V with GQA, and O)
  attention scores/values 4 * a * d * n_keys             (QK^T and AV; causal: token i
                                                          sees i + 1 keys, so a sequence
                                                          of length s has s(s+1)/2 pairs)
  dense MLP (gated SiLU)  2 * 3 * h * f                  (gate, up, down)
  MoE MLP                 2 * h * E                      (router)
                          + k * 2 * 3 * h * fe           (the active routed experts)
                          + 2 * 3 * h * fs [+ 2 * h]     (shared expert [and its gate])
and once per token the LM head, 2 * h * V. The embedding lookup is free.

A training step over sequences of lengths s_i costs 3 x forward (forward + backward),
plus one more forward under full recompute, or one more attention-core forward under
selective recompute (Megatron recomputes core attention only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from openr1_mega.config.schema import ArchConfig

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one pass over a batch, split by where they are spent."""

    attention_proj: float
    """Q, K, V and output projections."""
    attention_core: float
    """Causal score (QK^T) and value (AV) matmuls."""
    mlp: float
    """Dense (gated SiLU) MLP layers."""
    moe: float
    """MoE layers: router, active routed experts, shared expert."""
    lm_head: float
    """Output projection to the vocabulary."""

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))


def attention_proj_flops_per_token(arch: ArchConfig) -> float:
    """Q/K/V/O projection FLOPs of one token in one layer (GQA: K and V have g heads)."""
    q_width = arch.num_attention_heads * arch.head_dim
    kv_width = arch.num_kv_heads * arch.head_dim
    return 2.0 * arch.hidden_size * (2 * q_width + 2 * kv_width)


def attention_core_flops(arch: ArchConfig, seq_len: int) -> float:
    """Causal QK^T + AV FLOPs of one sequence in one layer: 4 * a * d * s(s+1)/2."""
    pairs = seq_len * (seq_len + 1) / 2
    return 4.0 * arch.num_attention_heads * arch.head_dim * pairs


def dense_mlp_flops_per_token(arch: ArchConfig) -> float:
    """Gated SiLU MLP of one token: gate, up and down projections."""
    return 2.0 * 3 * arch.hidden_size * arch.ffn_hidden_size


def moe_flops_per_token(arch: ArchConfig) -> float:
    """One MoE layer for one token: router + top-k experts + shared expert (if any)."""
    moe = arch.moe
    h = arch.hidden_size
    flops = 2.0 * h * moe.num_experts + moe.topk * 2.0 * 3 * h * moe.ffn_hidden_size
    if moe.shared_expert_ffn_hidden_size:
        flops += 2.0 * 3 * h * moe.shared_expert_ffn_hidden_size
        if moe.shared_expert_gate:
            flops += 2.0 * h
    return flops


def forward_flops(arch: ArchConfig, seq_lens: Sequence[int]) -> ForwardFlops:
    """Forward FLOPs of a batch of sequences (packed rows: pass each document's length)."""
    if any(s < 0 for s in seq_lens):
        raise ValueError(f"seq_lens must be >= 0, got {list(seq_lens)}")
    tokens = float(sum(seq_lens))
    n_moe = sum(arch.is_moe_layer(i) for i in range(arch.num_layers))
    n_dense = arch.num_layers - n_moe
    return ForwardFlops(
        attention_proj=arch.num_layers * tokens * attention_proj_flops_per_token(arch),
        attention_core=arch.num_layers * sum(attention_core_flops(arch, s) for s in seq_lens),
        mlp=n_dense * tokens * dense_mlp_flops_per_token(arch),
        moe=n_moe * tokens * moe_flops_per_token(arch) if n_moe else 0.0,
        lm_head=tokens * 2.0 * arch.hidden_size * arch.vocab_size,
    )


def train_step_flops(arch: ArchConfig, seq_lens: Sequence[int], recompute: str = "none") -> float:
    """Forward + backward FLOPs of one optimizer step over `seq_lens`, with recompute."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}: expected one of {list(RECOMPUTE_MODES)}")
    fwd = forward_flops(arch, seq_lens)
    extra = {"none": 0.0, "selective": fwd.attention_core, "full": fwd.total}[recompute]
    return 3.0 * fwd.total + extra


def matmul_params(arch: ArchConfig, active: bool = True) -> int:
    """Weights that take part in matmuls (layers + LM head; no embedding, norms, biases).

    `active=True` counts only the top-k routed experts of MoE layers (the FLOPs view,
    so that 6 * matmul_params * tokens is the training cost without attention scores).
    """
    h, arch_moe = arch.hidden_size, arch.moe
    attn = attention_proj_flops_per_token(arch) / 2
    dense = 3 * h * arch.ffn_hidden_size
    total = h * arch.vocab_size
    for layer in range(arch.num_layers):
        total += attn
        if not arch.is_moe_layer(layer):
            total += dense
            continue
        experts = arch_moe.topk if active else arch_moe.num_experts
        total += h * arch_moe.num_experts + experts * 3 * h * arch_moe.ffn_hidden_size
        if arch_moe.shared_expert_ffn_hidden_size:
            total += 3 * h * arch_moe.shared_expert_ffn_hidden_size
            total += h * int(arch_moe.shared_expert_gate)
    return int(total)
