"""Token log-probs from a Megatron GPTModel's logits, under any tensor-parallel size.

Megatron pads the vocabulary (to a multiple of 128 x TP) and, under TP, each rank holds
a [.., V_padded / TP] slice. The padded columns are not tokens: they are set to -inf so
the log-softmax matches the unpadded model (and vLLM). TP = 1 uses the fused
token_logprob kernel; TP > 1 its vocab-parallel form (partials all-reduced on the TP group).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from openr1_mega import ops


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
