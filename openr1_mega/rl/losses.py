"""GRPO policy loss: clipped surrogate + k3 KL, with the loss-aggregation variants.

For completion b, token t (shapes [B, T], `mask` 1 on response tokens):

    r      = exp(logp - logp_old)                                   (importance ratio)
    s      = min(r * A_b, clip(r, 1 - eps_low, 1 + eps_high) * A_b) (clip-higher: DAPO)
    kl     = exp(ref - logp) - (ref - logp) - 1                     (k3 estimator, >= 0)
    l_bt   = -(w_bt * s) + beta * kl                                (w: optional TIS weight)

and the per-token losses are aggregated by `loss_type`:

    grpo     mean over each sequence's tokens, then mean over sequences  (DeepSeekMath)
    bnpo     sum over all tokens / number of tokens in the batch (the trainer's batch is
             the step's whole rollout batch, over all data-parallel ranks, so with one
             optimizer step per rollout bnpo equals dapo; TRL's per-device bnpo differs
             only under gradient accumulation)
    dr_grpo  sum over all tokens / (B * max_completion_length)           (Dr. GRPO)
    dapo     sum over all tokens / number of tokens in the *global* batch (DAPO)

`denominator` overrides the divisor (sequences for grpo, tokens for bnpo/dapo, B*L for
dr_grpo) so a trainer that splits a batch into micro-batches and data-parallel ranks
passes the global count and the summed gradients equal the full-batch gradient. The
truncated importance-sampling (TIS) weight w = min(exp(logp_old - logp_sampler), C)
corrects for the gap between vLLM's sampler and the trainer's log-probs.

Pure functions: no I/O, no collectives. Metrics are detached 0-d tensors (no host sync).
"""

from __future__ import annotations

import torch

from openr1_mega.config.train import LOSS_TYPES  # the recipe checks the same names


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, loss_type: str = "grpo", eps_low: float = 0.2,
                eps_high: float = 0.2, beta: float = 0.0,
                ref_logprobs: torch.Tensor | None = None,
                max_completion_length: int | None = None,
                sampler_logprobs: torch.Tensor | None = None, tis_cap: float | None = None,
                denominator: float | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one (micro-)batch and its metrics.

    Args:
        logprobs: [B, T] current policy log-probs of the completion tokens (differentiable).
        old_logprobs: [B, T] log-probs of the policy that generated the batch (detached).
        advantages: [B] one advantage per completion.
        mask: [B, T] 1 for response tokens that count, 0 for padding / masked rows.
        loss_type: one of grpo, bnpo, dr_grpo, dapo (see the module docstring).
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] of the ratio.
        beta: KL coefficient; 0 needs no reference log-probs.
        ref_logprobs: [B, T] reference policy log-probs, required when beta > 0.
        max_completion_length: L in dr_grpo's B * L divisor.
        sampler_logprobs: [B, T] the rollout engine's log-probs, for the TIS weight.
        tis_cap: C of the TIS weight; None disables the correction.
        denominator: overrides the aggregation divisor (global counts across micro-batches).

    Returns:
        (loss, metrics): the scalar loss and a dict of detached 0-d tensors.
    """
    _check_inputs(logprobs, old_logprobs, advantages, mask, loss_type, eps_low, eps_high, beta,
                  ref_logprobs, max_completion_length, sampler_logprobs, tis_cap)
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    if tis_cap is not None:
        surrogate = surrogate * truncated_is_weight(old_logprobs, sampler_logprobs, tis_cap)
    per_token = -surrogate
    kl = None
    if beta > 0:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, loss_type, max_completion_length, denominator)
    return loss, _metrics(ratio, adv, mask, eps_low, eps_high, kl)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || ref): exp(d) - d - 1 with d = ref - logp."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


def truncated_is_weight(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                        cap: float) -> torch.Tensor:
    """min(pi_old / pi_sampler, cap) per token, detached (a correction, not a gradient path)."""
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap).detach()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
              max_completion_length: int | None = None,
              denominator: float | None = None) -> torch.Tensor:
    """Reduce [B, T] per-token losses to a scalar as `loss_type` prescribes."""
    masked = per_token * mask
    if loss_type == "grpo":
        per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_sequence.sum() / (denominator or per_token.shape[0])
    if loss_type in ("bnpo", "dapo"):
        return masked.sum() / (denominator or mask.sum().clamp(min=1.0))
    return masked.sum() / (denominator or per_token.shape[0] * max_completion_length)


def _metrics(ratio, adv, mask, eps_low, eps_high, kl) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)

        def token_mean(x: torch.Tensor) -> torch.Tensor:
            return (x.to(mask.dtype) * mask).sum() / tokens

        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        big = torch.finfo(ratio.dtype).max
        metrics = {
            "clip/low": token_mean(low), "clip/high": token_mean(high),
            "clip/region": token_mean(low | high),
            "ratio/mean": token_mean(ratio),
            "ratio/min": torch.where(mask > 0, ratio, big).min(),
            "ratio/max": torch.where(mask > 0, ratio, -big).max(),
        }
        if kl is not None:
            metrics["kl"] = token_mean(kl)
    return metrics


def _check_inputs(logprobs, old_logprobs, advantages, mask, loss_type, eps_low, eps_high, beta,
                  ref_logprobs, max_completion_length, sampler_logprobs, tis_cap) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask),
                    ("ref_logprobs", ref_logprobs), ("sampler_logprobs", sampler_logprobs)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logprobs shape "
                             f"{tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B]={logprobs.shape[0]}, got "
                         f"{tuple(advantages.shape)}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low/eps_high must be >= 0, got {eps_low}/{eps_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (or set beta=0 to skip the reference)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    if tis_cap is not None and (sampler_logprobs is None or tis_cap <= 0):
        raise ValueError("tis_cap needs sampler_logprobs and a cap > 0")
