"""The one translation from our configs to Megatron-Core's TransformerConfig.

Everything Megatron needs to know about the model (shape from `ArchConfig`, build choices
from `ModelConfig`, layout from `ParallelConfig`, dtype/FP8 from `PrecisionConfig`) is set
here and nowhere else. Fusions that need CUDA kernels (bias-activation, masked softmax,
RoPE, bias-dropout-add) are switched on only when the model is built on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from openr1_mega.config.schema import (
    ArchConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_name(dtype: torch.dtype) -> str:
    """'fp32', 'bf16' or 'fp16' for a torch dtype (the `precision.dtype` spelling)."""
    for name, value in TORCH_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported parameter dtype {dtype}; expected one of {list(TORCH_DTYPES)}")


def transformer_config(
    arch: ArchConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    model: ModelConfig | None = None,
    *,
    on_cuda: bool | None = None,
    use_te: bool = False,
) -> TransformerConfig:
    """Build Megatron's TransformerConfig for `arch` laid out as `parallel`.

    Args:
        arch: transformer shape read from the HF config.
        parallel: TP/PP/EP/CP layout.
        precision: parameter dtype and FP8.
        model: build choices (dispatcher, recompute, aux loss); defaults if None.
        on_cuda: whether the model lives on a GPU; None asks torch.
        use_te: whether the layer spec is Transformer Engine's (enables FP8).
    """
    model = model or ModelConfig()
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    if precision.fp8 and not use_te:
        raise ValueError("precision.fp8 needs Transformer Engine (model.attention_backend=te)")
    dtype = TORCH_DTYPES[precision.dtype]
    kwargs = dict(
        **_shape(arch),
        **_layout(parallel),
        **_numerics(dtype, precision, on_cuda),
        **_recompute(model.recompute),
        **(_moe(arch, model, on_cuda) if arch.moe else {}),
    )
    return TransformerConfig(**kwargs)


def _shape(arch: ArchConfig) -> dict:
    return dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
    )


def _layout(parallel: ParallelConfig) -> dict:
    return dict(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        # uneven pipeline stages; Megatron derives every layer offset from these two
        num_layers_in_first_pipeline_stage=parallel.pp_first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel.pp_last_stage_layers,
    )


def _numerics(dtype: torch.dtype, precision: PrecisionConfig, on_cuda: bool) -> dict:
    return dict(
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp8=precision.fp8,
        fp8_recipe=precision.fp8_recipe if precision.fp8 else None,
        use_cpu_initialization=not on_cuda,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_cuda,
        bias_dropout_fusion=on_cuda,
        masked_softmax_fusion=on_cuda,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
    )


def _recompute(mode: str) -> dict:
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)
    if mode == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return {}


def _moe(arch: ArchConfig, model: ModelConfig, on_cuda: bool) -> dict:
    moe = arch.moe
    dispatcher = model.moe_token_dispatcher
    if dispatcher == "auto":
        dispatcher = "alltoall" if on_cuda else "allgather"
    if dispatcher == "alltoall" and not on_cuda:
        raise ValueError("model.moe_token_dispatcher=alltoall needs CUDA (it creates streams); "
                         "use allgather on CPU")
    aux = moe.aux_loss_coeff if model.moe_aux_loss_coeff is None else model.moe_aux_loss_coeff
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_layer_freq=list(moe.layer_pattern),
        # softmax over all experts then top-k (unnormalised), or top-k logits then softmax
        # (= the renormalised top-k probabilities), exactly as HF's norm_topk_prob.
        moe_router_pre_softmax=not moe.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
        moe_aux_loss_coeff=aux,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=False,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=moe.shared_expert_gate,
    )
