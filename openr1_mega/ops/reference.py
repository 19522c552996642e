"""Pure-torch references of the kernels: the ground truth in tests (run in float64) and the
fallback when the compiled extension is missing. They are written from the definitions, not
from the kernels' algorithms (log_softmax over the whole row; scatter/view reductions), and
materialise whatever they need.

Shapes: N rows (tokens), V vocab entries (V_local on a vocab shard), B completions,
K groups, T packed tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_SCALES = ("group", "batch", "none")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Output dtype of the log-prob ops: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(logits.to(acc_dtype(logits.dtype)) / temperature, dim=-1)


def token_logprob_reference(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[y]: logits [N, V], targets [N] int64 -> [N] (float32/64)."""
    return _log_softmax(logits, temperature).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logprob_entropy_reference(
    logits: Tensor, targets: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(log-prob of the target, entropy of softmax(logits / T)), both [N]."""
    logp_all = _log_softmax(logits, temperature)
    p = logp_all.exp()
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)  # 0 * log 0 = 0, also in grad
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


def token_logprob_partials_reference(
    logits: Tensor, targets: Tensor, vocab_start: int, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One vocab shard's (max, sum exp(z - max), sum exp(z - max)(z - max), z[y] or 0).

    logits [N, V_local] hold global columns [vocab_start, vocab_start + V_local).
    """
    z = logits.to(acc_dtype(logits.dtype)) / temperature
    m = z.amax(-1)
    shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # all -inf: s = 0, not NaN
    d = z - shift.unsqueeze(-1)
    e = d.exp()
    s = e.sum(-1)
    w = (e * d.masked_fill(e == 0, 0.0)).sum(-1) if with_entropy else z.new_empty(0)
    local = targets - vocab_start
    owned = (local >= 0) & (local < z.shape[-1])
    picked = z.gather(-1, local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return m, s, w, torch.where(owned, picked, torch.zeros_like(picked))


def token_logprob_backward_reference(
    logits: Tensor,
    targets: Tensor,
    vocab_start: int,
    temperature: float,
    lse: Tensor,
    coef_target: Tensor,
    coef_p: Tensor,
    coef_plogp: Tensor | None,
) -> Tensor:
    """grad = (a [v == y] + p (b + c log p)) / T in logits' dtype, p = exp(z - lse)."""
    z = logits.to(acc_dtype(logits.dtype)) / temperature
    logp = z - lse.unsqueeze(-1)
    p = logp.exp()
    c = torch.zeros_like(coef_p) if coef_plogp is None else coef_plogp
    grad = p * (coef_p.unsqueeze(-1) + c.unsqueeze(-1) * logp.masked_fill(p == 0, 0.0))
    local = targets - vocab_start
    owned = (local >= 0) & (local < z.shape[-1])
    rows = torch.nonzero(owned).squeeze(-1)
    grad[rows, local[rows]] += coef_target[rows]
    return (grad / temperature).to(logits.dtype)


def _std(m2: Tensor, count: Tensor, unbiased: bool) -> Tensor:
    dof = count - 1 if unbiased else count
    ok = (count > 1) & (dof > 0)
    return torch.where(ok, (m2 / dof.clamp_min(1)).sqrt(), torch.zeros_like(m2))


def _contiguous_group_stats(r: Tensor, group_size: int, unbiased: bool):
    groups = r.view(-1, group_size)
    mean = groups.mean(-1)
    if group_size > 1:
        std = groups.std(-1, correction=1 if unbiased else 0)
    else:
        std = torch.zeros_like(mean)
    all_equal = (groups == groups[:, :1]).all(-1)
    return mean, std, all_equal


def _indexed_group_stats(r: Tensor, index: Tensor, num_groups: int, unbiased: bool):
    zeros = r.new_zeros(num_groups)
    count = zeros.index_add(0, index, torch.ones_like(r))
    mean = zeros.index_add(0, index, r) / count.clamp_min(1)
    dev = r - mean[index]
    std = _std(zeros.index_add(0, index, dev * dev), count, unbiased)
    hi = zeros.scatter_reduce(0, index, r, "amax", include_self=False)
    lo = zeros.scatter_reduce(0, index, r, "amin", include_self=False)
    return mean, std, (hi == lo) & (count > 0)


def grpo_advantage_reference(
    rewards: Tensor,
    group_index: Tensor | None,
    group_size: int,
    num_groups: int,
    scale: str = "group",
    eps: float = 1e-6,
    unbiased: bool = True,
    token_index: Tensor | None = None,
    response_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Group-relative advantages, computed in float64 and returned in rewards' dtype.

    Same contract as the `openr1_mega::grpo_advantage` op: rewards [B]; groups are contiguous
    runs of `group_size` when `group_index` is None, else `group_index` [B] in [0, K).
    Returns (advantages [B], token_advantages [T] (empty without a token layout),
    group_mean [K], group_std [K], number of non-empty all-equal groups (int64 scalar)).
    """
    r = rewards.double()
    if group_index is None:
        mean, std, all_equal = _contiguous_group_stats(r, group_size, unbiased)
        index = torch.arange(r.numel(), device=r.device) // group_size
    else:
        index = group_index
        mean, std, all_equal = _indexed_group_stats(r, index, num_groups, unbiased)
    if scale == "group":
        denom = std[index] + eps
    elif scale == "batch":
        batch_std = r.std(correction=1 if unbiased else 0) if r.numel() > 1 else r.new_zeros(())
        denom = batch_std + eps
    else:
        denom = torch.ones_like(r)
    adv = (r - mean[index]) / denom
    if token_index is None:
        tokens = r.new_empty(0)
    else:
        picked = adv[token_index.clamp(0, max(r.numel() - 1, 0))] if r.numel() else adv.new_zeros(
            token_index.shape
        )
        tokens = torch.where(response_mask, picked, torch.zeros_like(picked))
    out = rewards.dtype
    zero_std = all_equal.sum().to(torch.int64)
    return adv.to(out), tokens.to(out), mean.to(out), std.to(out), zero_std
