"""Per-token log-probabilities (and entropies) of target tokens: the fused kernel's op.

For logits [N, V], targets y [N] and temperature T (the sampler's), with z = logits / T:
    logp[n]    = z[n, y_n] - logsumexp_v z[n, v]
    entropy[n] = -sum_v p[n, v] log p[n, v],   p = softmax(z[n])
The kernel reads each row once (online max and sum-exp); backward recomputes p from the saved
log-sum-exp and writes grad_logits = (g_logp (onehot(y) - p) - g_ent p (log p + H)) / T directly
in the logits' dtype, so no fp32 [N, V] tensor ever exists. On CPU a gradient of 16 MiB or
more lives in a cached buffer that the next backward reuses once this one is freed (no fresh
600 MB to fault in every step; OPENR1_MEGA_GRAD_CACHE=0 turns that off,
`release_grad_cache()` unmaps the buffer). Outputs are float32 (float64 for
float64 logits). Leading dimensions are allowed: logits [..., V], targets [...].

Op `openr1_mega::token_logprob_fwd` (C++ schema in csrc/bindings.cpp) gets its fake kernel and
autograd here; `openr1_mega::token_logprob_bwd` is its backward (not differentiable again).
Without the compiled extension the pure-torch reference serves (autograd through torch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from openr1_mega.ops import reference
from openr1_mega.ops._checks import (
    check_logits,
    check_target_range,
    check_targets,
    check_temperature,
)
from openr1_mega.ops._extension import extension_loaded, use_kernel

__all__ = ["release_grad_cache", "token_logprob", "token_logprob_entropy"]


def token_logprob(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, *, inplace_backward: bool = False
) -> Tensor:
    """Log-probability of each target token under softmax(logits / temperature).

    Args:
        logits: [..., V] float32/float64/bfloat16/float16 (V may be any size, e.g. 151936).
        targets: [...] integer token ids in [0, V).
        temperature: T > 0; must equal the sampler's temperature.
        inplace_backward: backward writes grad_logits over the logits' own storage, so the
            step allocates no [N, V] tensor at all (Megatron's vocab-parallel cross entropy
            does the same). Only when nothing reads the logits after backward (the usual
            case: they come from the output layer, whose backward needs its inputs, not its
            output); autograd raises if another op saved them. No retain_graph.

    Returns:
        [...] float32 (float64 for float64 logits), differentiable with respect to logits.
    """
    return _token_logprob(logits, targets, temperature, False, inplace_backward)[0]


def token_logprob_entropy(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, *, inplace_backward: bool = False
) -> tuple[Tensor, Tensor]:
    """Target log-probabilities and the entropy of softmax(logits / temperature), fused.

    Same arguments as `token_logprob`; returns (logp [...], entropy [...]), both
    differentiable with respect to logits.
    """
    return _token_logprob(logits, targets, temperature, True, inplace_backward)


def release_grad_cache() -> int:
    """Unmaps the buffer the CPU backward keeps for the next large gradient (e.g. before a
    phase that needs the memory, such as starting a vLLM engine); returns its size in bytes,
    0 when none is cached or the extension is not built."""
    if not extension_loaded():
        return 0
    return torch.ops.openr1_mega.release_grad_cache()


def _token_logprob(
    logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool, inplace: bool
) -> tuple[Tensor, Tensor]:
    check_logits(logits)
    temperature = check_temperature(temperature)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    targets = check_targets(targets, lead, logits.device)
    check_target_range(targets, 0, vocab)
    rows = as_rows(logits)
    if inplace and use_kernel("token_logprob_bwd_", logits.device):
        logp, entropy = _InplaceBackwardLogprob.apply(
            rows, targets.reshape(-1), temperature, with_entropy
        )
    elif use_kernel("token_logprob_fwd", logits.device):
        logp, _, entropy = torch.ops.openr1_mega.token_logprob_fwd(
            rows, targets.reshape(-1), temperature, with_entropy
        )
    elif with_entropy:
        logp, entropy = reference.token_logprob_entropy_reference(
            rows, targets.reshape(-1), temperature
        )
    else:
        logp = reference.token_logprob_reference(rows, targets.reshape(-1), temperature)
        entropy = logp.new_empty(0)
    return logp.reshape(lead), entropy.reshape(lead) if with_entropy else entropy


def as_rows(logits: Tensor) -> Tensor:
    """logits [..., V] as a 2-D [N, V] view with unit vocab stride (copies only if needed)."""
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.shape[-1] > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] > 1 and rows.stride(0) < rows.shape[-1]:
        rows = rows.contiguous()  # e.g. an expanded tensor: rows must not overlap
    return rows


def grad_coefficients(
    grad_logp: Tensor | None,
    grad_lse: Tensor | None,
    grad_entropy: Tensor | None,
    entropy: Tensor | None,
    like: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row (a, b, c) with grad_logits = (a [v == y] + p (b + c log p)) / T.

    From d logp/dz = onehot - p, d lse/dz = p and d H/dz = -p (log p + H):
    a = g_logp, b = -g_logp + g_lse - g_ent H, c = -g_ent. Missing grads count as zero.
    """
    a = grad_logp if grad_logp is not None else torch.zeros_like(like)
    b = -a
    if grad_lse is not None:
        b = b + grad_lse
    c = None
    if grad_entropy is not None and entropy is not None and grad_entropy.numel() > 0:
        b = b - grad_entropy * entropy
        c = (-grad_entropy).contiguous()
    return a.contiguous(), b.contiguous(), c


def forward_stats(
    rows: Tensor, targets: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, lse, entropy) of [N, V] rows without autograd: the kernel or the reference."""
    if use_kernel("token_logprob_fwd", rows.device):
        return torch.ops.openr1_mega.token_logprob_fwd(rows, targets, temperature, with_entropy)
    m, s, w, target_z = reference.token_logprob_partials_reference(
        rows, targets, 0, temperature, with_entropy
    )
    lse = m + s.log()
    entropy = s.log() - w / s if with_entropy else w
    return target_z - lse, lse, entropy


def partials(
    rows: Tensor, targets: Tensor, vocab_start: int, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One vocab shard's (max, sumexp, wsum, target_z): the kernel or the reference."""
    if use_kernel("token_logprob_partials", rows.device):
        return torch.ops.openr1_mega.token_logprob_partials(
            rows, targets, vocab_start, temperature, with_entropy
        )
    return reference.token_logprob_partials_reference(
        rows, targets, vocab_start, temperature, with_entropy
    )


def backward_rows(
    rows: Tensor,
    targets: Tensor,
    vocab_start: int,
    temperature: float,
    lse: Tensor,
    coefs: tuple[Tensor, Tensor, Tensor | None],
) -> Tensor:
    """grad of [N, V(_local)] rows in their dtype from per-row coefficients (see above)."""
    if use_kernel("token_logprob_bwd", rows.device):
        return torch.ops.openr1_mega.token_logprob_bwd(
            rows, targets, vocab_start, temperature, lse, *coefs
        )
    return reference.token_logprob_backward_reference(
        rows, targets, vocab_start, temperature, lse, *coefs
    )


class _InplaceBackwardLogprob(torch.autograd.Function):
    """token_logprob_fwd whose backward overwrites the logits with their gradient."""

    @staticmethod
    def forward(ctx, rows, targets, temperature, with_entropy):
        logp, lse, entropy = torch.ops.openr1_mega.token_logprob_fwd(
            rows, targets, temperature, with_entropy
        )
        ctx.save_for_backward(rows, targets, lse, entropy if with_entropy else None)
        ctx.temperature = temperature
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        rows, targets, lse, entropy = ctx.saved_tensors
        coefs = grad_coefficients(grad_logp, None, grad_entropy, entropy, lse)
        torch.ops.openr1_mega.token_logprob_bwd_(rows, targets, 0, ctx.temperature, lse, *coefs)
        torch.autograd.graph.increment_version(rows)  # other saved users of the logits now fail
        return rows, None, None, None


def _register() -> None:
    """Fake kernels for the compiled ops and autograd for token_logprob_fwd."""

    @torch.library.register_fake("openr1_mega::token_logprob_fwd")
    def _fwd_fake(logits, targets, temperature, with_entropy):
        n, dtype = logits.shape[0], reference.acc_dtype(logits.dtype)
        entropy = logits.new_empty(n if with_entropy else 0, dtype=dtype)
        return logits.new_empty(n, dtype=dtype), logits.new_empty(n, dtype=dtype), entropy

    @torch.library.register_fake("openr1_mega::token_logprob_partials")
    def _partials_fake(logits, targets, vocab_start, temperature, with_entropy):
        n, dtype = logits.shape[0], reference.acc_dtype(logits.dtype)
        wsum = logits.new_empty(n if with_entropy else 0, dtype=dtype)
        return tuple(logits.new_empty(n, dtype=dtype) for _ in range(2)) + (
            wsum,
            logits.new_empty(n, dtype=dtype),
        )

    @torch.library.register_fake("openr1_mega::token_logprob_bwd")
    def _bwd_fake(logits, targets, vocab_start, temperature, lse, coef_target, coef_p, coef_plogp):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("openr1_mega::token_logprob_bwd_")
    def _bwd_inplace_fake(logits, targets, vocab_start, temperature, lse, coef_target, coef_p,
                          coef_plogp):
        return None

    def setup_context(ctx, inputs, output):
        logits, targets, temperature, with_entropy = inputs
        _, lse, entropy = output
        ctx.save_for_backward(logits, targets, lse, entropy if with_entropy else None)
        ctx.temperature = temperature

    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        coefs = grad_coefficients(grad_logp, grad_lse, grad_entropy, entropy, lse)
        grad = torch.ops.openr1_mega.token_logprob_bwd(
            logits, targets, 0, ctx.temperature, lse, *coefs
        )
        return grad, None, None, None

    torch.library.register_autograd(
        "openr1_mega::token_logprob_fwd", backward, setup_context=setup_context
    )


if extension_loaded():
    _register()
