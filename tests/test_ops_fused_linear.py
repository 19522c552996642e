"""fused_linear_token_logprob(_entropy): chunked over rows, equal to logits = hidden @ weight.T
followed by the float64 reference, with gradients for hidden and weight."""

from __future__ import annotations

import pytest
import torch

from openr1_mega import ops
from openr1_mega.ops import reference

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason="extension not built")

N, H, V = 7, 16, 45


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 3, N, 100])
def test_matches_float64_reference_with_grads(chunk_size):
    hidden, weight, targets = _inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = ops.fused_linear_token_logprob_entropy(h, w, targets, 0.8, chunk_size)
    (logp.sum() + 0.3 * ent.sum()).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_logp, ref_ent = reference.token_logprob_entropy_reference(h64 @ w64.T, targets, 0.8)
    (ref_logp.sum() + 0.3 * ref_ent.sum()).backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.double(), ref_logp, **tol)
    torch.testing.assert_close(ent.double(), ref_ent, **tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)


def test_logprob_only_and_no_weight_grad():
    hidden, weight, targets = _inputs()
    h = hidden.clone().requires_grad_()
    logp = ops.fused_linear_token_logprob(h, weight, targets, chunk_size=2)
    logp.sum().backward()
    h64 = hidden.double().requires_grad_()
    ref = reference.token_logprob_reference(h64 @ weight.double().T, targets)
    ref.sum().backward()
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)


def test_bfloat16_equals_unfused_kernel():
    hidden, weight, targets = _inputs(torch.bfloat16)
    fused = ops.fused_linear_token_logprob(hidden, weight, targets, chunk_size=3)
    unfused = ops.token_logprob(hidden @ weight.T, targets)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=0)


def test_gradcheck_float64():
    hidden, weight, targets = _inputs(torch.float64)
    h, w = hidden[:4, :5].clone().requires_grad_(), weight[:6, :5].clone().requires_grad_()
    t = targets[:4] % 6
    assert torch.autograd.gradcheck(
        lambda a, b: ops.fused_linear_token_logprob_entropy(a, b, t, 1.2, 3), (h, w)
    )


@pytest.mark.parametrize(
    "hidden, weight, chunk_size, arg",
    [
        (torch.zeros(3), torch.zeros(5, 4), 2, "hidden"),
        (torch.zeros(3, 4), torch.zeros(5, 3), 2, "weight"),
        (torch.zeros(3, 4), torch.zeros(5, 4, dtype=torch.float64), 2, "weight"),
        (torch.zeros(3, 4), torch.zeros(5, 4), 0, "chunk_size"),
    ],
)
def test_errors_name_the_argument(hidden, weight, chunk_size, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        ops.fused_linear_token_logprob(hidden, weight, torch.zeros(3, dtype=torch.long),
                                       chunk_size=chunk_size)


def test_target_out_of_range_names_targets():
    with pytest.raises(ValueError, match="^targets"):
        ops.fused_linear_token_logprob(torch.zeros(2, 4), torch.zeros(5, 4), torch.tensor([0, 5]))
