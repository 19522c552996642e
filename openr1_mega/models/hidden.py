"""The policy forward that stops before the output layer: final hidden states, not logits.

Megatron-Core 0.16.1's `GPTModel.forward` runs embedding -> decoder (whose last stage ends
with the final layernorm) -> `_postprocess`, and `_postprocess` returns the decoder's output
unchanged when `post_process` is False: that is how a non-last pipeline stage hands its
activations on. `forward_hidden` calls the (DDP-wrapped) model with that attribute cleared on
this model instance for the duration of the call, so the last stage returns its final
hidden states [S, B, H] (split along S across the TP ranks under sequence parallel) and the
loss computes log-probs from them with `train.logprobs.hidden_to_logprobs`, without a
[B, S, V] logits tensor. Nothing process-wide changes; other stages return what they always
return. `output_weight` gives the weight `_postprocess` would have used (the embedding's
when tied and the stage holds the embedding, else the output layer's).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.models.gpt import GPTModel

from openr1_mega.models.build import unwrap


def forward_hidden(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
    """The model's forward, returning final hidden states [S(/TP under SP), B, H] on the last
    stage (after the final norm) and the usual activations on the other stages.

    `model` may be wrapped (DDP, Float16Module); call it where you would call `model(...)`,
    e.g. inside Megatron's pipeline schedule: the last stage's loss function then receives the
    hidden states. `kwargs` go to `GPTModel.forward` (e.g. packed_seq_params).
    """
    gpt = unwrap(model)
    _check_supported(gpt)
    with _without_output_layer(gpt):
        return model(input_ids, position_ids, attention_mask, **kwargs)


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The last stage's output-layer weight [V_padded / TP, H], tied or not, as Megatron's
    `_postprocess` picks it."""
    gpt = unwrap(model)
    if not gpt.post_process:
        raise ValueError("output_weight: this pipeline stage has no output layer")
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def _check_supported(gpt: GPTModel) -> None:
    if not isinstance(gpt, GPTModel):
        raise TypeError(f"forward_hidden: expected a Megatron GPTModel, got {type(gpt).__name__}")
    if gpt.mtp_process or gpt.config.mtp_num_layers:
        raise ValueError("forward_hidden: multi-token prediction computes its loss inside the "
                         "output stage; it is not supported here")
    if getattr(gpt, "embedding_activation_buffer", None) is not None:
        raise ValueError("forward_hidden: defer_embedding_wgrad_compute needs Megatron's own "
                         "output layer; turn it off")


@contextlib.contextmanager
def _without_output_layer(gpt: GPTModel):
    """Within the block, this GPTModel's forward returns the decoder output (see top)."""
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved
