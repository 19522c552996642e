"""The gradient buffer cache of token_logprob's CPU backward (csrc/grad_buffer.h).

Gradients of at least 16 MiB live in a cached, reused mapping. Checked: every gradient
equals the float64 reference whether its buffer is new or reused (no stale values), a reused
buffer is really the previous one, gradients alive together never share a buffer, the
caller's logits stay untouched, and OPENR1_MEGA_GRAD_CACHE=0 / release_grad_cache() leave
nothing cached.
"""

from __future__ import annotations

import pytest
import torch

from openr1_mega import ops
from openr1_mega.ops import reference

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason="extension not built")

ROWS, VOCAB = 64, 70_000  # float32: 17.9 MB, above the 16 MiB the cache starts at
ENV = "OPENR1_MEGA_GRAD_CACHE"


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    ops.release_grad_cache()
    yield
    ops.release_grad_cache()


def _case(seed, rows=ROWS):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=g) * 3
    targets = torch.randint(0, VOCAB, (rows,), generator=g)
    return logits.requires_grad_(), targets, torch.randn(rows, generator=g)


def _grad(logits, targets, weights):
    """The kernel's gradient of sum(logp * weights), checked against float64 autograd."""
    (grad,) = torch.autograd.grad(ops.token_logprob(logits, targets) * weights, logits,
                                  torch.ones_like(weights))
    x64 = logits.detach().double().requires_grad_()
    ref_logp = reference.token_logprob_reference(x64, targets, 1.0)
    (ref,) = torch.autograd.grad((ref_logp * weights.double()).sum(), x64)
    torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-9)
    return grad


def test_freed_gradient_buffer_is_reused_with_fresh_values():
    first = _grad(*_case(0))
    address = first.data_ptr()
    del first
    second = _grad(*_case(1))  # new values: a stale buffer would fail the reference check
    assert second.data_ptr() == address


def test_live_gradients_never_share_a_buffer_and_logits_stay_untouched():
    logits, targets, weights = _case(2)
    pristine = logits.detach().clone()
    first = _grad(logits, targets, weights)
    kept = first.clone()
    second = _grad(*_case(3))
    assert second.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept)
    assert torch.equal(logits.detach(), pristine)


def test_much_smaller_gradient_takes_a_new_buffer_and_the_larger_stays_cached():
    big = _grad(*_case(4))
    big_bytes, address = big.numel() * 4, big.data_ptr()
    del big
    small = _grad(*_case(5, rows=ROWS // 4))
    assert small.data_ptr() != address
    del small
    assert ops.release_grad_cache() >= big_bytes


def test_cache_off_and_release_leave_nothing_cached(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    _grad(*_case(6))  # freed at once
    assert ops.release_grad_cache() == 0
    monkeypatch.delenv(ENV)
    grad = _grad(*_case(7))
    del grad
    assert ops.release_grad_cache() > 0
    assert ops.release_grad_cache() == 0
