"""Build the Megatron-Core GPTModel of an HF architecture for this rank's pipeline stage.

    initialize(ParallelConfig(tp=2))                     # openr1_mega.parallel.init
    model = build_model("path/to/hf", ParallelConfig(tp=2), precision=PrecisionConfig("fp32"))
    load_hf_weights(model, "path/to/hf")                 # openr1_mega.checkpoint.hf

The model carries its `ArchConfig` (`model_arch(model)`), so conversion and weight sync
need nothing else. Its vocabulary is padded to a multiple of 128 x TP: logits have
`arch.padded_vocab_size(tp)` columns, of which the first `arch.vocab_size` are real (the
padding rows of the embedding and output layer are zero).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from transformers import PretrainedConfig

from openr1_mega.config.layout import check_layout
from openr1_mega.config.schema import ArchConfig, ModelConfig, ParallelConfig, PrecisionConfig
from openr1_mega.config.to_megatron import transformer_config
from openr1_mega.models.archs import arch_config
from openr1_mega.models.specs import block_spec, resolve_backend

ARCH_ATTR = "openr1_arch"


def build_model(
    hf_config_or_dir: str | Path | dict | PretrainedConfig | ArchConfig,
    parallel: ParallelConfig,
    *,
    precision: PrecisionConfig | None = None,
    model: ModelConfig | None = None,
    meta: bool = False,
    vocab_tp: int | None = None,
) -> GPTModel:
    """GPTModel for the current rank (call `parallel.init.initialize(parallel)` first).

    Args:
        hf_config_or_dir: HF model dir, config.json dict, PretrainedConfig or ArchConfig.
        parallel: the layout `initialize` was called with.
        precision: parameter dtype (default bf16).
        model: build choices (attention backend, dispatcher, recompute).
        meta: build on the meta device without initialisation (shapes only; used by
            checkpoint conversion to stream tensors without holding the model).
        vocab_tp: pad the vocabulary as for this TP size instead of `parallel.tp` (a
            converter writing a checkpoint meant for another layout).
    """
    arch = hf_config_or_dir if isinstance(hf_config_or_dir, ArchConfig) \
        else arch_config(hf_config_or_dir)
    precision = precision or PrecisionConfig()
    model = model or ModelConfig()
    _check_groups(parallel)
    validate_layout(arch, parallel)
    backend = resolve_backend(model.attention_backend)
    config = transformer_config(arch, parallel, precision, model, use_te=backend == "te",
                                on_cuda=torch.cuda.is_available() and not meta)
    config.perform_initialization = not meta
    with torch.device("meta") if meta else contextlib.nullcontext():
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, arch, backend),
            vocab_size=arch.padded_vocab_size(vocab_tp or parallel.tp),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            parallel_output=True,
        )
    if torch.cuda.is_available() and not meta:
        gpt.cuda(torch.cuda.current_device())
    setattr(gpt, ARCH_ATTR, arch)
    return gpt


def model_arch(model: torch.nn.Module) -> ArchConfig:
    """The ArchConfig a model was built from (through DDP / Float16Module wrappers)."""
    return getattr(unwrap(model), ARCH_ATTR)


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(model, ARCH_ATTR) and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, ARCH_ATTR):
        raise ValueError("model was not built by openr1_mega.models.build.build_model")
    return model


def validate_layout(arch: ArchConfig, parallel: ParallelConfig) -> None:
    """Raise ValueError naming the field when `parallel` cannot split `arch` (uneven
    pipeline stages included, see config.layout), or when this machine cannot run it."""
    check_layout(arch, parallel)
    if parallel.cp > 1 and resolve_backend("auto") != "te":
        raise ValueError("parallel.cp > 1 needs Transformer Engine on a GPU")


def _check_groups(parallel: ParallelConfig) -> None:
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call openr1_mega.parallel.init.initialize(parallel) first")
    got = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
           ps.get_expert_model_parallel_world_size())
    if got != (parallel.tp, parallel.pp, parallel.ep):
        raise ValueError(f"parallel (tp, pp, ep)={(parallel.tp, parallel.pp, parallel.ep)} "
                         f"differs from the initialized groups {got}")
