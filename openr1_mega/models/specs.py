"""Layer specs, chosen in this one place: Transformer Engine or local + SDPA attention.

- `te`: Megatron's Transformer Engine spec (fused LayerNorm-linear, TE attention with
  flash/cuDNN kernels and context parallelism, FP8 through TransformerConfig.fp8).
- `sdpa`: Megatron's local linears (ColumnParallelLinear / RowParallelLinear, SequentialMLP
  experts) with our `SDPAttention` core attention and HF-exact `RMSNorm`.
`auto` takes TE when it imports and a GPU is present, else sdpa. Both specs give the same
checkpoint keys (the local spec maps its separate norms onto TE's fused names), so a
checkpoint saved with one loads with the other.
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from openr1_mega.config.schema import ArchConfig
from openr1_mega.models.modules import RMSNorm, SDPAttention


def have_te() -> bool:
    """Whether Transformer Engine is importable (checked without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(attention_backend: str) -> str:
    """'te' or 'sdpa' for a `model.attention_backend` setting (auto, te, sdpa)."""
    if attention_backend == "te":
        if not have_te():
            raise ImportError("model.attention_backend=te but transformer_engine is not "
                              "installed")
        return "te"
    if attention_backend == "auto" and have_te() and torch.cuda.is_available():
        return "te"
    return "sdpa"


def block_spec(config: TransformerConfig, arch: ArchConfig, backend: str,
               pp_rank: int | None = None) -> TransformerBlockSubmodules:
    """Specs of the layers this pipeline stage builds (dense or MoE per layer)."""
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return get_gpt_decoder_block_spec(config, use_transformer_engine=True,
                                          normalization="RMSNorm", pp_rank=pp_rank)
    layers = [local_layer_spec(arch, arch.is_moe_layer(i)) for i in range(arch.num_layers)]
    offset = get_transformer_layer_offset(config, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=layers[offset:offset + count],
                                      layer_norm=RMSNorm)


def local_layer_spec(arch: ArchConfig, moe: bool) -> ModuleSpec:
    """One decoder layer: RMSNorm -> attention (SDPA) -> RMSNorm -> MLP or MoE."""
    qk_norm = RMSNorm if arch.qk_norm else IdentityOp
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=SDPAttention,
            linear_proj=RowParallelLinear, q_layernorm=qk_norm, k_layernorm=qk_norm),
    )
    # Checkpoint keys as the TE spec names them (its norms are fused into the next linear;
    # in TE MoE layers pre_mlp_layernorm stays a separate module).
    keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if not moe:
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm, self_attention=attention,
            self_attn_bda=get_bias_dropout_add, pre_mlp_layernorm=RMSNorm,
            mlp=_moe_spec(arch) if moe else _dense_mlp_spec(),
            mlp_bda=get_bias_dropout_add, sharded_state_dict_keys_map=keys_map),
    )


def _dense_mlp_spec() -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                           linear_fc2=RowParallelLinear))


def _moe_spec(arch: ArchConfig) -> ModuleSpec:
    return get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=arch.moe.num_experts,
                                           moe_grouped_gemm=False)
