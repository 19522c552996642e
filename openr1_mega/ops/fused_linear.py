"""Token log-probs straight from hidden states and the output-layer weight, chunk by chunk.

logits = hidden @ weight.T would be [N, V]: for a 32k-token completion and Qwen's 151936-entry
vocabulary that is 9.9 GB in bf16 before any fp32 copy. Here forward takes `chunk_size` rows at
a time: logits_c = hidden_c @ weight.T, then the token_logprob kernel on logits_c, keeping only
the per-row log-sum-exp (and entropy). Backward recomputes logits_c per chunk, turns it into
grad_logits_c with the backward kernel (in the logits' dtype, over logits_c's own storage when
the compiled kernel is there), and accumulates grad_hidden_c = grad_logits_c @ weight and
grad_weight += grad_logits_c.T @ hidden_c. Peak extra memory is a few [chunk_size, V] tensors
instead of several [N, V] ones, at the price of one more matmul per chunk in backward.
grad_weight accumulates in float32 across chunks when the weight is 16-bit (as Megatron's main
grads do; each chunk's GEMM runs in the weight's dtype, so no fp32 copy of a chunk's logits is
made), then is cast to the weight's dtype.

Vocab-parallel form (`group` given): `weight` is this rank's [V_local, H] shard of global vocab
ids [vocab_start, vocab_start + V_local). Forward collects each chunk's shard partials (max,
sum-exp, target logit) and combines all rows at once with the two all-reduces of
`openr1_mega.ops.vocab_parallel`; backward needs no collective (the local shard's gradient only
depends on the global lse). grad_hidden is then this shard's partial sum: the caller reduces it
over the group (Megatron's column-parallel output layer does so with its input mapping).
Padded vocabulary (`vocab_size` given): global columns >= vocab_size are set to -inf in each
chunk, so they hold no probability and get no gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from openr1_mega.ops._checks import check_target_range, check_targets, check_temperature
from openr1_mega.ops._extension import use_kernel
from openr1_mega.ops.token_logprob import backward_rows, forward_stats, grad_coefficients, partials
from openr1_mega.ops.vocab_parallel import _check_owners, _combine

__all__ = ["fused_linear_token_logprob", "fused_linear_token_logprob_entropy"]

DEFAULT_CHUNK_SIZE = 1024


def fused_linear_token_logprob(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    vocab_start: int = 0,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """log softmax(hidden @ weight.T / T)[y] without materialising the [N, V] logits.

    Args:
        hidden: [N, H] final hidden states (after the final norm).
        weight: [V, H] output-layer (LM head) weight, same dtype and device as hidden; with
            `group`, this rank's [V_local, H] shard of global ids [vocab_start, +V_local).
        targets: [N] global token ids in [0, vocab_size).
        temperature: T > 0, the sampler's.
        chunk_size: rows per chunk; peak extra memory is a few [chunk_size, V(_local)] tensors.
        vocab_start: first global vocab id of `weight`'s rows (0 without `group`).
        group: the tensor-parallel group the vocabulary is split over; None: not split.
        vocab_size: real vocabulary size; global columns >= it (padding) are masked out.
            None: every column is real.

    Returns:
        [N] float32 (float64 for float64 inputs), differentiable w.r.t. hidden and weight; equal
        on every rank of `group`.
    """
    return _fused(hidden, weight, targets, temperature, chunk_size, False,
                  _Vocab(vocab_start, group, vocab_size))[0]


def fused_linear_token_logprob_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    vocab_start: int = 0,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(logp, entropy) of softmax(hidden @ weight.T / T), chunk by chunk; see above."""
    return _fused(hidden, weight, targets, temperature, chunk_size, True,
                  _Vocab(vocab_start, group, vocab_size))


class _Vocab:
    """Which global vocab ids `weight`'s rows hold, over which group, and how many are real."""

    def __init__(self, start: int, group: dist.ProcessGroup | None, size: int | None):
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"vocab_start: expected an int >= 0, got {start!r}")
        if group is None and start != 0:
            raise ValueError(f"vocab_start: {start} needs the group the vocabulary is split over")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"vocab_size: expected an int >= 1 or None, got {size!r}")
        self.start, self.group, self.size = start, group, size

    def target_bound(self, local_vocab: int) -> int:
        """Targets must lie below this (a split vocabulary without a size: checked by owners)."""
        if self.size is not None:
            return self.size
        return local_vocab if self.group is None else torch.iinfo(torch.int64).max

    def real_columns(self, local_vocab: int) -> int:
        """How many of this shard's columns are real tokens (the rest is padding)."""
        if self.size is None:
            return local_vocab
        return min(max(self.size - self.start, 0), local_vocab)


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


def _fused(hidden, weight, targets, temperature, chunk_size, with_entropy, vocab: _Vocab):
    _check(hidden, weight, chunk_size)
    temperature = check_temperature(temperature)
    targets = check_targets(targets, hidden.shape[:1], hidden.device)
    check_target_range(targets, 0, vocab.target_bound(weight.shape[0]))
    return _FusedLinearLogprob.apply(hidden, weight, targets, temperature, chunk_size,
                                     with_entropy, vocab)


def _chunks(n: int, chunk_size: int):
    return [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def _chunk_logits(hidden_c: Tensor, weight: Tensor, real_columns: int) -> Tensor:
    """[c, V_local] logits of one chunk, padded columns set to -inf (in place: a fresh tensor)."""
    logits = hidden_c @ weight.T
    if real_columns < logits.shape[1]:
        logits[:, real_columns:] = float("-inf")
    return logits


def _local_stats(hidden, weight, targets, temperature, chunk_size, with_entropy, real):
    """(logp, lse, entropy) per row when this rank holds the whole vocabulary."""
    outs = [forward_stats(_chunk_logits(hidden[a:b], weight, real), targets[a:b], temperature,
                          with_entropy)
            for a, b in _chunks(hidden.shape[0], chunk_size)]
    return tuple(torch.cat([o[i] for o in outs]) for i in range(3))


def _parallel_stats(hidden, weight, targets, temperature, chunk_size, with_entropy, vocab, real):
    """(logp, lse, entropy) per row from this rank's vocab shard, combined over vocab.group."""
    parts = [partials(_chunk_logits(hidden[a:b], weight, real), targets[a:b], vocab.start,
                      temperature, with_entropy)
             for a, b in _chunks(hidden.shape[0], chunk_size)]
    m, s, w, target_z = (torch.cat([p[i] for p in parts]) for i in range(4))
    local = targets - vocab.start
    owned = (local >= 0) & (local < weight.shape[0])
    logp, lse, entropy, owners = _combine(m, s, w, target_z, owned, vocab.group, with_entropy)
    _check_owners(owners)
    return logp, lse, entropy


class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy, vocab):
        real = vocab.real_columns(weight.shape[0])
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if hidden.shape[0] == 0:
            logp = lse = entropy = hidden.new_empty(0, dtype=acc)
        elif vocab.group is None:
            logp, lse, entropy = _local_stats(hidden, weight, targets, temperature, chunk_size,
                                              with_entropy, real)
        else:
            logp, lse, entropy = _parallel_stats(hidden, weight, targets, temperature,
                                                 chunk_size, with_entropy, vocab, real)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy if with_entropy else None)
        ctx.temperature, ctx.chunk_size, ctx.vocab_start, ctx.real = (
            temperature, chunk_size, vocab.start, real)
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
            grad_logits = _grad_logits(ctx, _chunk_logits(hidden[a:b], weight, ctx.real),
                                       targets[a:b], lse[a:b], chunk_coefs)
            if want_hidden:
                grad_hidden[a:b] = grad_logits @ weight
            if want_weight:
                _accumulate_weight_grad(grad_weight, grad_logits, hidden[a:b])
        return (grad_hidden, grad_weight.to(weight.dtype) if want_weight else None,
                None, None, None, None, None)


def _accumulate_weight_grad(grad_weight: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """grad_weight += grad_logits.T @ hidden. 16-bit: the GEMM in the inputs' dtype (fp32
    inside), summed over chunks in fp32, so no fp32 copy of the [c, V] chunk is made."""
    if grad_weight.dtype == grad_logits.dtype:
        grad_weight.addmm_(grad_logits.T, hidden)
    else:
        grad_weight.add_(grad_logits.T @ hidden)


def _grad_logits(ctx, logits: Tensor, targets: Tensor, lse: Tensor, coefs) -> Tensor:
    """The chunk's logits gradient, written over the recomputed logits when the kernel can."""
    if use_kernel("token_logprob_bwd_", logits.device):
        torch.ops.openr1_mega.token_logprob_bwd_(logits, targets, ctx.vocab_start,
                                                 ctx.temperature, lse, *coefs)
        return logits
    return backward_rows(logits, targets, ctx.vocab_start, ctx.temperature, lse, coefs)
