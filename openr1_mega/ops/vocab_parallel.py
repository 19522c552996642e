"""Token log-probs (and entropies) with the vocabulary split over tensor-parallel ranks.

Each rank holds logits_shard [N, V_local] for global vocab ids [vocab_start, vocab_start +
V_local). The kernel returns the shard's partials per row: max m_r, s_r = sum exp(z - m_r),
w_r = sum exp(z - m_r)(z - m_r) and the target logit where the rank owns it. Forward combines
them with two all-reduces on `group`:
    M = max_r m_r                                   (all-reduce MAX)
    S = sum_r s_r e^(m_r - M),  W = sum_r e^(m_r - M)(w_r + (m_r - M) s_r),
    z_y = sum_r target_z_r,     owners = sum_r [rank owns y]      (one all-reduce SUM)
    lse = M + log S,  logp = z_y - lse,  entropy = log S - W / S.
Backward needs no collective: the gradient of the local shard only depends on the global lse
and entropy saved by forward, grad = (g_logp [v == y] + p (b + c log p)) / T on the shard,
computed by the same backward kernel with the vocab offset. The upstream gradient must be the
same on every rank of `group` (the loss is replicated across TP ranks, as in Megatron-Core);
the gradient of the input to the vocab-parallel output layer is all-reduced by that layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from openr1_mega.ops._checks import (
    check_logits,
    check_target_range,
    check_targets,
    check_temperature,
    values_readable,
)
from openr1_mega.ops._extension import use_kernel
from openr1_mega.ops.token_logprob import as_rows, backward_rows, grad_coefficients, partials

__all__ = ["vocab_parallel_token_logprob", "vocab_parallel_token_logprob_entropy"]


def vocab_parallel_token_logprob(
    logits_shard: Tensor,
    targets: Tensor,
    vocab_start: int,
    group: dist.ProcessGroup | None,
    temperature: float = 1.0,
    *,
    inplace_backward: bool = False,
) -> Tensor:
    """Log-probs of global target ids from this rank's vocab shard, combined over `group`.

    Args:
        logits_shard: [..., V_local] logits of global vocab ids [vocab_start, +V_local).
        targets: [...] global token ids (the same on every rank).
        vocab_start: first global vocab id of this shard.
        group: the tensor-parallel process group (None: the default group).
        temperature: T > 0, the sampler's.
        inplace_backward: write the shard's gradient over logits_shard (see
            `openr1_mega.ops.token_logprob`).

    Returns:
        [...] float32 (float64 for float64 logits), equal on every rank; differentiable with
        respect to logits_shard.
    """
    return _vocab_parallel(logits_shard, targets, vocab_start, group, temperature, False,
                           inplace_backward)[0]


def vocab_parallel_token_logprob_entropy(
    logits_shard: Tensor,
    targets: Tensor,
    vocab_start: int,
    group: dist.ProcessGroup | None,
    temperature: float = 1.0,
    *,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """(logp, entropy) of the full-vocabulary softmax from a vocab shard; see above."""
    return _vocab_parallel(logits_shard, targets, vocab_start, group, temperature, True,
                           inplace_backward)


def _vocab_parallel(logits_shard, targets, vocab_start, group, temperature, with_entropy,
                    inplace):
    check_logits(logits_shard, "logits_shard")
    temperature = check_temperature(temperature)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start: expected an int >= 0, got {vocab_start!r}")
    lead = logits_shard.shape[:-1]
    targets = check_targets(targets, lead, logits_shard.device)
    check_target_range(targets, 0, torch.iinfo(torch.int64).max)
    logp, entropy = _VocabParallelLogprob.apply(
        as_rows(logits_shard), targets.reshape(-1), vocab_start, group, temperature, with_entropy,
        inplace,
    )
    return logp.reshape(lead), entropy.reshape(lead) if with_entropy else entropy


def _combine(m, s, w, target_z, owned, group, with_entropy):
    """All-reduce the shards' partials into the global (logp, lse, entropy, owners)."""
    global_max = m.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    nonempty = s > 0  # an all -inf shard contributes nothing (and must not make NaN)
    scale = torch.where(nonempty, (m - global_max).exp(), torch.zeros_like(s))
    parts = [s * scale, target_z, owned.to(s.dtype)]
    if with_entropy:
        shifted = torch.where(nonempty, w + (m - global_max) * s, torch.zeros_like(s))
        parts.append(scale * shifted)
    summed = torch.stack(parts)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    total_s, z_y, owners = summed[0], summed[1], summed[2]
    lse = global_max + total_s.log()
    entropy = total_s.log() - summed[3] / total_s if with_entropy else w
    return z_y - lse, lse, entropy, owners


def _check_owners(owners: Tensor) -> None:
    """Each target must lie in exactly one shard (i.e. inside the global vocabulary)."""
    if values_readable(owners):
        bad = owners != 1
        if bool(bad.any()):  # host sync on a GPU
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets: the target at position {row} lies in no vocab shard "
                             "(outside the global vocabulary)")


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, targets, vocab_start, group, temperature, with_entropy, inplace):
        m, s, w, target_z = partials(rows, targets, vocab_start, temperature, with_entropy)
        local = targets - vocab_start
        owned = (local >= 0) & (local < rows.shape[-1])
        logp, lse, entropy, owners = _combine(m, s, w, target_z, owned, group, with_entropy)
        _check_owners(owners)
        ctx.save_for_backward(rows, targets, lse, entropy if with_entropy else None)
        ctx.vocab_start, ctx.temperature, ctx.inplace = vocab_start, temperature, inplace
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        rows, targets, lse, entropy = ctx.saved_tensors
        coefs = grad_coefficients(grad_logp, None, grad_entropy, entropy, lse)
        if ctx.inplace and use_kernel("token_logprob_bwd_", rows.device):
            torch.ops.openr1_mega.token_logprob_bwd_(
                rows, targets, ctx.vocab_start, ctx.temperature, lse, *coefs
            )
            torch.autograd.graph.increment_version(rows)
            return rows, None, None, None, None, None, None
        grad = backward_rows(rows, targets, ctx.vocab_start, ctx.temperature, lse, coefs)
        return grad, None, None, None, None, None, None
