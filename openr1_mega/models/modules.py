"""Our two layer modules for the local (non-Transformer-Engine) spec.

SDPAttention  Megatron core-attention interface around
              `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
              kernels on GPU, the fused CPU kernel on CPU) instead of Megatron's unfused
              baddbmm + softmax + bmm. GQA runs without repeating K/V (`enable_gqa`).
              Packed sequences (`PackedSeqParams`, qkv_format "thd") get a block-diagonal
              causal mask built from `cu_seqlens_q`. Shared-prompt rows (`SharedPromptParams`,
              models/shared_prompt.py) attend prompt and completions apart.
RMSNorm       the Hugging Face Qwen RMSNorm numerics (normalise in fp32, cast back, then
              scale), which Megatron's torch-norm wrapper lacks; unlike that wrapper it
              allows sequence parallelism (its weight is marked for the TP grad all-reduce).

Shapes: s = sequence, b = batch, n = query heads on this TP rank, g = KV groups on this
rank, d = head dim, t = packed tokens.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from openr1_mega.models.shared_prompt import SharedPromptParams, shared_prompt_attention


class SDPAttention(MegatronModule):
    """Core attention (softmax(QK^T * scale + mask) V) through torch SDPA."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention: context parallelism needs Transformer Engine "
                             "(model.attention_backend=te)")
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention: apply_query_key_layer_scaling is not supported")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        """query [s, b, n, d], key/value [s, b, g, d] (thd: [t, n|g, d]) -> [s, b, n*d].

        `attention_mask` follows Megatron: bool, True = masked out, broadcastable to
        [b, n, s, s]. Without a mask, causal attention is applied.
        """
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        dropout = self.dropout if self.training else 0.0
        if isinstance(packed_seq_params, SharedPromptParams):
            with self._rng_region(dropout):
                return shared_prompt_attention(query, key, value, packed_seq_params,
                                               self.softmax_scale, dropout)
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:  # [t, n, d] -> one sequence of t tokens with a block-diagonal mask
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            attention_mask = _packed_causal_mask(packed_seq_params.cu_seqlens_q, query.shape[0])
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal and q.shape[2] > 1
        with self._rng_region(dropout):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if attention_mask is None else ~attention_mask,
                dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1])
        out = out.permute(2, 0, 1, 3)  # [s, b, n, d]
        out = out.reshape(out.shape[0], out.shape[1], -1)
        return out.squeeze(1) if thd else out

    def _rng_region(self, dropout: float):
        if dropout > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()


def _packed_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, 1, t, t] bool, True = masked: causal within each packed sequence, none across."""
    pos = torch.arange(total, device=cu_seqlens.device)
    seq = torch.bucketize(pos, cu_seqlens[1:].to(pos.dtype), right=True)
    allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    return ~allowed[None, None]


class RMSNorm(torch.nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)), normalised in fp32 as Hugging Face Qwen does."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6,
                 **unused) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each TP rank sees a slice of the tokens: Megatron sums
        # the grads of parameters carrying this flag across the TP group.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> same shape and dtype."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)
