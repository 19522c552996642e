"""Token log-probs from a Megatron GPTModel's logits or final hidden states, under any TP size.

Megatron pads the vocabulary (to a multiple of 128 x TP) and, under TP, each rank holds
a [.., V_padded / TP] slice. The padded columns are not tokens: they are set to -inf so
the log-softmax matches the unpadded model (and vLLM). TP = 1 uses the fused
token_logprob kernel; TP > 1 its vocab-parallel form (partials all-reduced on the TP group).

`hidden_to_logprobs` is the loss path without logits: from the final hidden states that
`models.hidden.forward_hidden` returns, it does what the column-parallel output layer does
to its input (under sequence parallel all-gather the sequence, backward reduce-scatter; under
plain TP copy, backward all-reduce) and then the output-layer matmul fused with token_logprob,
chunk by chunk over tokens (`ops.fused_linear_token_logprob`), so peak extra memory is
O(chunk_size x V / TP) instead of several [B, S, V / TP] tensors.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from openr1_mega import ops
from openr1_mega.models.build import unwrap
from openr1_mega.models.hidden import output_weight
from openr1_mega.ops.fused_linear import DEFAULT_CHUNK_SIZE


def logits_to_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                       temperature: float = 1.0) -> torch.Tensor:
    """log p(targets) for logits [B, S, V_local] and targets [B, S]; returns fp32 [B, S]."""
    batch, seq, local_vocab = logits.shape
    tp = ps.get_tensor_model_parallel_world_size()
    start = ps.get_tensor_model_parallel_rank() * local_vocab
    if start + local_vocab > vocab_size:  # this rank holds padded columns
        column = torch.arange(local_vocab, device=logits.device) + start
        logits = logits.masked_fill(column >= vocab_size, float("-inf"))
    flat_logits = logits.reshape(batch * seq, local_vocab)
    flat_targets = targets.reshape(batch * seq)
    if tp == 1:
        logp = ops.token_logprob(flat_logits, flat_targets, temperature=temperature)
    else:
        logp = ops.vocab_parallel_token_logprob(
            flat_logits, flat_targets, start, ps.get_tensor_model_parallel_group(),
            temperature=temperature)
    return logp.view(batch, seq)


def hidden_to_logprobs(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                       vocab_size: int, temperature: float = 1.0,
                       chunk_size: int = DEFAULT_CHUNK_SIZE,
                       sources: torch.Tensor | None = None) -> torch.Tensor:
    """log p(targets) from the last stage's final hidden states, never forming [B, S, V] logits.

    Args:
        model: the (wrapped) GPTModel whose last stage produced `hidden`.
        hidden: [S_local, B, H] from `forward_hidden` (S_local = S / TP under sequence parallel).
        targets: [B, T] token ids, T <= S: targets[b, t] is scored at position t (pass the
            next tokens, T = S - 1, as for logits[:, :-1]).
        vocab_size: the real vocabulary; padded columns >= it are masked out.
        temperature: T > 0, the sampler's.
        chunk_size: tokens per chunk of the output-layer matmul.
        sources: [C, T] flat indices s * B + sequence of the hidden states that score
            `targets` [C, T] (rl/experience.py: completion tokens only, shared-prompt rows);
            None scores targets[b, t] at position t as above.

    Returns:
        fp32 targets-shaped, differentiable w.r.t. hidden and the output weight; equal on
        every TP rank.
    """
    return _hidden_to(model, hidden, targets, vocab_size, temperature, chunk_size, False,
                      sources)[0]


def hidden_to_logprobs_entropy(model: torch.nn.Module, hidden: torch.Tensor,
                               targets: torch.Tensor, vocab_size: int, temperature: float = 1.0,
                               chunk_size: int = DEFAULT_CHUNK_SIZE
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [B, T], entropy [B, T]) of softmax(logits / T); see `hidden_to_logprobs`."""
    return _hidden_to(model, hidden, targets, vocab_size, temperature, chunk_size, True)


def _hidden_to(model, hidden, targets, vocab_size, temperature, chunk_size, with_entropy,
               sources=None):
    layer, weight = unwrap(model).output_layer, output_weight(model)
    full = _output_layer_input(layer, hidden).to(weight.dtype)  # [S, B, H]
    seq, batch = full.shape[:2]
    if sources is not None:
        return _scored_at(layer, weight, full, targets, sources, vocab_size, temperature,
                          chunk_size)
    if targets.dim() != 2 or targets.shape[0] != batch or targets.shape[1] > seq:
        raise ValueError(f"targets: expected [{batch}, T <= {seq}] for hidden states of "
                         f"{seq} positions x {batch} sequences, got {tuple(targets.shape)}")
    steps, flat_targets = targets.shape[1], targets.T.reshape(-1)
    rows = full[:steps].reshape(steps * batch, full.shape[2])  # [T*B, H], a view
    split = _vocab_split(layer, weight, vocab_size)
    if with_entropy:
        logp, entropy = ops.fused_linear_token_logprob_entropy(
            rows, weight, flat_targets, temperature, chunk_size, **split)
        return _batch_major(logp, batch), _batch_major(entropy, batch)
    logp = ops.fused_linear_token_logprob(rows, weight, flat_targets, temperature, chunk_size,
                                          **split)
    return _batch_major(logp, batch), None


def _scored_at(layer, weight, full, targets, sources, vocab_size, temperature, chunk_size):
    """Log-probs [C, T] of `targets` scored at the flat `sources` of hidden states [S, B, H]."""
    if sources.shape != targets.shape or targets.dim() != 2:
        raise ValueError(f"sources {tuple(sources.shape)} and targets {tuple(targets.shape)} "
                         f"must be the same [C, T]")
    rows = full.reshape(-1, full.shape[2]).index_select(0, sources.reshape(-1))  # [C*T, H]
    logp = ops.fused_linear_token_logprob(rows, weight, targets.reshape(-1), temperature,
                                          chunk_size, **_vocab_split(layer, weight, vocab_size))
    return logp.view(targets.shape), None


def _vocab_split(layer, weight, vocab_size: int) -> dict:
    """Where this TP rank's slice of the output layer starts, its group, the real vocab."""
    tp = _group_size(layer.tp_group)
    return {"vocab_start": _group_rank(layer.tp_group) * weight.shape[0] if tp > 1 else 0,
            "group": layer.tp_group if tp > 1 else None, "vocab_size": vocab_size}


def _batch_major(values: torch.Tensor, batch: int) -> torch.Tensor:
    """[T*B] in (position, sequence) order -> [B, T]."""
    return values.view(-1, batch).T.contiguous()


def _group_size(group) -> int:
    return torch.distributed.get_world_size(group) if group is not None else 1


def _group_rank(group) -> int:
    return torch.distributed.get_rank(group) if group is not None else 0


def _output_layer_input(layer, hidden: torch.Tensor) -> torch.Tensor:
    """What ColumnParallelLinear feeds its matmul: the full sequence, with the backward
    collective that sums the vocab shards' partial input gradients."""
    if layer.sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, True, group=layer.tp_group)
    if _group_size(layer.tp_group) > 1:
        return copy_to_tensor_model_parallel_region(hidden, group=layer.tp_group)
    return hidden
