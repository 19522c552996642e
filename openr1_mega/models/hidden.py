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

`rope_positions=True` rotates queries and keys at `position_ids` instead of Megatron's
0..S-1 (which ignores position_ids under RoPE): shared-prompt rows (rl/experience.py) place
several completions after one prompt, each continuing the prompt's positions. The model's
rotary module answers with a [S, B, 1, D] table for the duration of the call, which
Megatron's unfused RoPE broadcasts over heads like its own [S, 1, 1, D].
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel

from openr1_mega.models.build import unwrap


def forward_hidden(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, *, rope_positions: bool = False,
                   **kwargs) -> torch.Tensor:
    """The model's forward, returning final hidden states [S(/TP under SP), B, H] on the last
    stage (after the final norm) and the usual activations on the other stages.

    `model` may be wrapped (DDP, Float16Module); call it where you would call `model(...)`,
    e.g. inside Megatron's pipeline schedule: the last stage's loss function then receives the
    hidden states. `kwargs` go to `GPTModel.forward` (e.g. packed_seq_params).
    """
    gpt = unwrap(model)
    _check_supported(gpt)
    rope = _rope_at(gpt, position_ids) if rope_positions else contextlib.nullcontext()
    with _without_output_layer(gpt), rope:
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
def _rope_at(gpt: GPTModel, position_ids: torch.Tensor):
    """Within the block, the model's RoPE table is that of `position_ids` [B, S]."""
    rope = getattr(gpt, "rotary_pos_emb", None)
    if type(rope) is not RotaryEmbedding or gpt.config.apply_rope_fusion:
        raise ValueError("rope_positions (grpo.shared_prompt) needs plain unfused RoPE; this "
                         f"model has {type(rope).__name__}"
                         f"{' with apply_rope_fusion' if gpt.config.apply_rope_fusion else ''}")
    rope.forward = lambda *args, **kwargs: _rope_table(rope, position_ids)
    try:
        yield
    finally:
        del rope.forward


def _rope_table(rope: RotaryEmbedding, position_ids: torch.Tensor) -> torch.Tensor:
    """[S, B, 1, D] rotation angles at `position_ids` [B, S], as `RotaryEmbedding.get_emb`
    computes them for 0..S-1."""
    inv_freq = rope.inv_freq.to(position_ids.device)
    seq = position_ids.T.to(inv_freq.dtype)
    if rope.seq_len_interpolation_factor is not None:
        seq = seq * (1 / rope.seq_len_interpolation_factor)
    freqs = seq[..., None] * inv_freq  # [S, B, D/2]
    if rope.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, :, None, :]


@contextlib.contextmanager
def _without_output_layer(gpt: GPTModel):
    """Within the block, this GPTModel's forward returns the decoder output (see top)."""
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved
