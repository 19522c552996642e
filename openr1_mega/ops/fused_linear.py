"""Token log-probs straight from hidden states and the output-layer weight, chunk by chunk.

logits = hidden @ weight.T would be [N, V]: for a 32k-token completion and Qwen's 151936-entry
vocabulary that is 9.9 GB in bf16 before any fp32 copy. Here forward takes `chunk_size` rows at
a time: logits_c = hidden_c @ weight.T, then the token_logprob kernel on logits_c, keeping only
the per-row log-sum-exp (and entropy). Backward recomputes logits_c per chunk, turns it into
grad_logits_c with the backward kernel (in the logits' dtype), and accumulates
grad_hidden_c = grad_logits_c @ weight and grad_weight += grad_logits_c.T @ hidden_c.
Peak extra memory is a few [chunk_size, V] tensors instead of several [N, V] ones, at the
price of one more matmul per chunk in backward. grad_weight accumulates in float32 across
chunks when the weight is 16-bit (as Megatron's main grads do), then is cast to the weight's
dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from openr1_mega.ops._checks import check_target_range, check_targets, check_temperature
from openr1_mega.ops.token_logprob import backward_rows, forward_stats, grad_coefficients

__all__ = ["fused_linear_token_logprob", "fused_linear_token_logprob_entropy"]

DEFAULT_CHUNK_SIZE = 1024


def fused_linear_token_logprob(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """log softmax(hidden @ weight.T / T)[y] without materialising the [N, V] logits.

    Args:
        hidden: [N, H] final hidden states (after the final norm).
        weight: [V, H] output-layer (LM head) weight, same dtype and device as hidden.
        targets: [N] token ids in [0, V).
        temperature: T > 0, the sampler's.
        chunk_size: rows per chunk; peak extra memory is a few [chunk_size, V] tensors.

    Returns:
        [N] float32 (float64 for float64 inputs), differentiable w.r.t. hidden and weight.
    """
    return _fused(hidden, weight, targets, temperature, chunk_size, False)[0]


def fused_linear_token_logprob_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """(logp, entropy) of softmax(hidden @ weight.T / T), chunk by chunk; see above."""
    return _fused(hidden, weight, targets, temperature, chunk_size, True)


def _check(hidden: Tensor, weight: Tensor, chunk_size: int) -> None:
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        shape = tuple(getattr(hidden, "shape", ()))
        raise ValueError(f"hidden: expected a [N, H] tensor, got shape {shape}")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden: dtype must be floating point, got {hidden.dtype}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected a [V, {hidden.shape[1]}] tensor, got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.shape[0] < 1:
        raise ValueError("weight: the vocab dimension must be >= 1")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight: must match hidden's dtype and device ({hidden.dtype}, "
                         f"{hidden.device}), got {weight.dtype}, {weight.device}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")


def _fused(hidden, weight, targets, temperature, chunk_size, with_entropy):
    _check(hidden, weight, chunk_size)
    temperature = check_temperature(temperature)
    targets = check_targets(targets, hidden.shape[:1], hidden.device)
    check_target_range(targets, 0, weight.shape[0])
    return _FusedLinearLogprob.apply(hidden, weight, targets, temperature, chunk_size,
                                     with_entropy)


def _chunks(n: int, chunk_size: int):
    return [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):
        outs = [forward_stats(hidden[a:b] @ weight.T, targets[a:b], temperature, with_entropy)
                for a, b in _chunks(hidden.shape[0], chunk_size)]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp, lse, entropy = (
            torch.cat([o[i] for o in outs]) if outs else hidden.new_empty(0, dtype=acc)
            for i in range(3)
        )
        ctx.save_for_backward(hidden, weight, targets, lse, entropy if with_entropy else None)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        coefs = grad_coefficients(grad_logp, None, grad_entropy, entropy, lse)
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        wide = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        grad_weight = (torch.zeros(weight.shape, dtype=wide, device=weight.device)
                       if want_weight else None)
        for a, b in _chunks(hidden.shape[0], ctx.chunk_size):
            chunk_coefs = tuple(c[a:b] if c is not None else None for c in coefs)
            grad_logits = backward_rows(hidden[a:b] @ weight.T, targets[a:b], 0, ctx.temperature,
                                        lse[a:b], chunk_coefs)
            if want_hidden:
                grad_hidden[a:b] = grad_logits @ weight
            if want_weight:
                grad_weight.addmm_(grad_logits.T.to(wide), hidden[a:b].to(wide))
        return (grad_hidden, grad_weight.to(weight.dtype) if want_weight else None,
                None, None, None, None)
