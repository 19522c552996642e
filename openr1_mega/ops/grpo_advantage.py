"""Group-relative advantages for GRPO: the fused kernel's op.

Completions are grouped by prompt; with group mean mu_g and standard deviation sd_g:
    scale="group":  A_i = (r_i - mu_g) / (sd_g + eps)     (GRPO, DeepSeekMath)
    scale="batch":  A_i = (r_i - mu_g) / (sd_B + eps)     (sd_B over the whole batch; Lite PPO)
    scale="none":   A_i =  r_i - mu_g                     (Dr. GRPO)
The std is unbiased (divides by n - 1) by default, as TRL and verl compute it; a group of one
has std 0 (so its advantage is 0, where TRL would give NaN). Groups are contiguous runs of
`group_size`, or arbitrary via `group_ids` (variable sizes: prompts keep fewer completions
after filtering). `grpo_advantage_stats` also returns per-token advantages for a packed token
layout, the per-group mean and std, and the number of groups whose rewards are all exactly
equal (zero-advantage groups, a GRPO health metric). Sums run in float64 in the kernels.

Op `openr1_mega::grpo_advantage` (C++ schema in csrc/bindings.cpp); forward only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from openr1_mega.ops import reference
from openr1_mega.ops._checks import values_readable
from openr1_mega.ops._extension import extension_loaded, use_kernel

__all__ = ["GrpoAdvantageStats", "grpo_advantage", "grpo_advantage_stats"]


class GrpoAdvantageStats(NamedTuple):
    """Outputs of `grpo_advantage_stats` (K groups, T packed tokens)."""

    advantages: Tensor
    """Same shape as rewards."""
    token_advantages: Tensor | None
    """[T]: advantage of each token's completion, 0 where the response mask is False."""
    group_mean: Tensor
    """[K] mean reward per group (groups ordered by group id, or by position)."""
    group_std: Tensor
    """[K] reward std per group (biased or unbiased as requested)."""
    num_zero_std_groups: Tensor
    """int64 scalar: groups whose rewards are all equal (their advantages are all 0)."""


def grpo_advantage(
    rewards: Tensor,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-6,
    unbiased: bool = True,
) -> Tensor:
    """Group-normalised advantages, same shape as `rewards`.

    Args:
        rewards: [B] (or [P, G]: P prompts x G completions) rewards, one per completion.
        group_size: G, for groups that are contiguous runs of G completions.
        group_ids: [B] integer group (prompt) id per completion, for any grouping.
            Give group_size or group_ids; neither is allowed for 2-D rewards (rows = groups).
        scale: "group", "batch" or "none" (see the module docstring).
        eps: added to the std before dividing.
        unbiased: divide the sum of squares by n - 1 (TRL, verl) instead of n.

    Returns:
        Advantages in rewards' dtype (float32 for non-float32/64 rewards).
    """
    return grpo_advantage_stats(rewards, group_size, group_ids, scale, eps, unbiased).advantages


def grpo_advantage_stats(
    rewards: Tensor,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-6,
    unbiased: bool = True,
    token_index: Tensor | None = None,
    response_mask: Tensor | None = None,
) -> GrpoAdvantageStats:
    """`grpo_advantage` plus per-token advantages and group statistics, in one kernel call.

    Args:
        rewards, group_size, group_ids, scale, eps, unbiased: as in `grpo_advantage`.
        token_index: [T] completion index (into the flattened rewards) of each packed token.
        response_mask: [T] bool, True on response tokens; masked tokens get 0 (their
            token_index is not read, so padding may carry any value, e.g. -1).

    Returns:
        GrpoAdvantageStats; num_zero_std_groups stays a tensor (no host sync).
    """
    flat = _check_rewards(rewards)
    _check_options(scale, eps, unbiased)
    index, size, num_groups = _group_layout(rewards, flat, group_size, group_ids)
    tokens, mask = _check_tokens(flat, token_index, response_mask)
    args = (flat, index, size, num_groups, scale, float(eps), bool(unbiased), tokens, mask)
    if use_kernel("grpo_advantage", flat.device):
        adv, token_adv, mean, std, zero = torch.ops.openr1_mega.grpo_advantage(*args)
    else:
        adv, token_adv, mean, std, zero = reference.grpo_advantage_reference(*args)
    return GrpoAdvantageStats(adv.reshape(rewards.shape), token_adv if tokens is not None else None,
                              mean, std, zero)


def _check_rewards(rewards: Tensor) -> Tensor:
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards: expected a tensor, got {type(rewards).__name__}")
    if rewards.dtype.is_complex:
        raise ValueError(f"rewards: dtype must be real, got {rewards.dtype}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards: expected shape [B] or [P, G], got {tuple(rewards.shape)}")
    dtype = rewards.dtype if rewards.dtype in (torch.float32, torch.float64) else torch.float32
    return rewards.reshape(-1).to(dtype)


def _check_options(scale: str, eps: float, unbiased: bool) -> None:
    if scale not in reference.ADVANTAGE_SCALES:
        raise ValueError(f"scale: expected one of {reference.ADVANTAGE_SCALES}, got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    if not isinstance(unbiased, bool):
        raise ValueError(f"unbiased: expected a bool, got {unbiased!r}")


def _group_layout(rewards: Tensor, flat: Tensor, group_size, group_ids):
    """(dense group index or None, group size, number of groups) from the caller's grouping."""
    if group_size is not None and group_ids is not None:
        raise ValueError("group_ids: give either group_size or group_ids, not both")
    if group_ids is not None:
        if not isinstance(group_ids, Tensor) or group_ids.shape != rewards.shape:
            raise ValueError(f"group_ids: expected a tensor of shape {tuple(rewards.shape)}, got "
                             f"{tuple(getattr(group_ids, 'shape', ()))}")
        if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex:
            raise ValueError(f"group_ids: dtype must be an integer type, got {group_ids.dtype}")
        if group_ids.device != rewards.device:
            raise ValueError(f"group_ids: must be on {rewards.device} like rewards")
        ids, index = torch.unique(group_ids.reshape(-1), return_inverse=True)  # sorts; GPU sync
        return index, 1, ids.numel()
    if group_size is None:
        if rewards.dim() != 2:
            raise ValueError("group_size: give group_size or group_ids for 1-D rewards "
                             "(or pass rewards as [num_prompts, group_size])")
        group_size = rewards.shape[1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected an int >= 1, got {group_size!r}")
    if flat.numel() % group_size:
        raise ValueError(f"group_size: {flat.numel()} rewards do not split into groups of "
                         f"{group_size}")
    return None, group_size, flat.numel() // group_size


def _check_tokens(flat: Tensor, token_index, response_mask):
    if token_index is None and response_mask is None:
        return None, None
    if token_index is None or response_mask is None:
        raise ValueError("response_mask: token_index and response_mask must be given together")
    if token_index.dim() != 1 or token_index.dtype.is_floating_point:
        raise ValueError(f"token_index: expected a 1-D integer tensor, got {token_index.dtype} "
                         f"of shape {tuple(token_index.shape)}")
    if response_mask.shape != token_index.shape:
        raise ValueError(f"response_mask: expected shape {tuple(token_index.shape)}, got "
                         f"{tuple(response_mask.shape)}")
    if token_index.device != flat.device or response_mask.device != flat.device:
        raise ValueError(f"token_index: token_index and response_mask must be on {flat.device}")
    tokens, mask = token_index.long(), response_mask.bool()
    if values_readable(tokens):
        bad = mask & ((tokens < 0) | (tokens >= flat.numel()))
        if bool(bad.any()):  # host sync on a GPU
            raise ValueError(f"token_index: unmasked tokens must index a completion in "
                             f"[0, {flat.numel()}), e.g. position {int(bad.nonzero()[0, 0])}")
    return tokens, mask


def _register() -> None:
    @torch.library.register_fake("openr1_mega::grpo_advantage")
    def _fake(rewards, group_index, group_size, num_groups, scale, eps, unbiased, token_index,
              response_mask):
        num_tokens = token_index.shape[0] if token_index is not None else 0
        return (
            torch.empty_like(rewards),
            rewards.new_empty(num_tokens),
            rewards.new_empty(num_groups),
            rewards.new_empty(num_groups),
            rewards.new_empty((), dtype=torch.int64),
        )


if extension_loaded():
    _register()
