"""openr1_mega.ops.token_logprob / token_logprob_entropy against float64 references.

Tolerances: float32 rtol 1e-5 (atol 1e-5 in log space); bf16/fp16 logits: the kernel's error
against the float64 result on the same 16-bit inputs is at most 2x the error plain PyTorch makes
computing log_softmax in that dtype. The float64 path is checked with gradcheck.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openr1_mega import ops
from openr1_mega.ops import reference

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason="extension not built")


def _logits(n, v, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


def _targets(n, v, seed=1):
    return torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))


def _ref64(logits, targets, temperature=1.0):
    return reference.token_logprob_entropy_reference(logits.double(), targets, temperature)


def _max_err(x, ref):
    return (x.double() - ref).abs().max().item()


@pytest.mark.parametrize("n,v", [(1, 1), (1, 7), (3, 1), (5, 13), (4, 1023), (3, 1500), (2, 4099)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_forward_fp32_matches_float64(n, v, temperature):
    x, t = _logits(n, v), _targets(n, v)
    logp, ent = ops.token_logprob_entropy(x, t, temperature)
    ref_logp, ref_ent = _ref64(x, t, temperature)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == (n,)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.token_logprob(x, t, temperature), logp, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_error_within_twice_pytorch(dtype):
    x, t, temperature = _logits(6, 3001, dtype), _targets(6, 3001), 0.8
    ref_logp, ref_ent = _ref64(x, t, temperature)
    logp, ent = ops.token_logprob_entropy(x, t, temperature)
    plain = torch.log_softmax(x / temperature, dim=-1)  # computed in the 16-bit dtype
    plain_logp = plain.gather(-1, t[:, None]).squeeze(-1)
    plain_ent = -(plain.exp() * plain).sum(-1)
    assert _max_err(logp, ref_logp) <= 2 * _max_err(plain_logp, ref_logp)
    assert _max_err(ent, ref_ent) <= 2 * _max_err(plain_ent, ref_ent)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_grad_within_twice_pytorch(dtype):
    x, t = _logits(4, 2053, dtype), _targets(4, 2053)
    g_logp, g_ent = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x64 = x.double().requires_grad_()
    ref_logp, ref_ent = _ref64(x64, t)
    (ref_grad,) = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_ent * g_ent).sum(), x64)
    xk = x.clone().requires_grad_()
    logp, ent = ops.token_logprob_entropy(xk, t)
    (grad,) = torch.autograd.grad((logp * g_logp.float()).sum() + (ent * g_ent.float()).sum(), xk)
    xp = x.clone().requires_grad_()
    plain = torch.log_softmax(xp, dim=-1)
    plain_loss = (plain.gather(-1, t[:, None]).squeeze(-1) * g_logp.to(dtype)).sum() + (
        -(plain.exp() * plain).sum(-1) * g_ent.to(dtype)
    ).sum()
    (plain_grad,) = torch.autograd.grad(plain_loss, xp)
    assert grad.dtype == dtype
    assert _max_err(grad, ref_grad) <= 2 * _max_err(plain_grad, ref_grad)


def test_fp32_grad_matches_float64():
    x, t = _logits(5, 1031), _targets(5, 1031)
    x64 = x.double().requires_grad_()
    ref_logp, ref_ent = _ref64(x64, t, 1.3)
    ref_grad = torch.autograd.grad(ref_logp.sum() - 0.5 * ref_ent.sum(), x64)[0]
    xk = x.clone().requires_grad_()
    logp, ent = ops.token_logprob_entropy(xk, t, 1.3)
    (logp.sum() - 0.5 * ent.sum()).backward()
    torch.testing.assert_close(xk.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("with_entropy", [True, False])
def test_inplace_backward_matches_and_reuses_storage(with_entropy):
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(301, 8, dtype=torch.float64).bfloat16().float().requires_grad_()
    t = _targets(6, 301)
    grads = []
    for inplace in (False, True):
        logits = (hidden @ weight.T).bfloat16()
        fn = ops.token_logprob_entropy if with_entropy else ops.token_logprob
        out = fn(logits, t, 0.9, inplace_backward=inplace)
        loss = out[0].sum() + 0.5 * out[1].sum() if with_entropy else out.sum()
        grads.append(torch.autograd.grad(loss, (hidden, weight, logits)))
    for plain, inplace in zip(grads[0][:2], grads[1][:2], strict=True):
        torch.testing.assert_close(plain, inplace, rtol=0, atol=0)
    assert torch.equal(grads[0][2], grads[1][2])


def test_inplace_backward_refuses_logits_saved_elsewhere():
    logits = (torch.randn(3, 10, requires_grad=True) * 1).exp()  # exp saves its output
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ops.token_logprob(logits, torch.tensor([0, 1, 2]), inplace_backward=True).sum().backward()


def test_gradcheck_float64():
    x = _logits(3, 11, torch.float64).requires_grad_()
    t = _targets(3, 11)
    assert torch.autograd.gradcheck(lambda z: ops.token_logprob_entropy(z, t, 0.7), (x,))
    assert torch.autograd.gradcheck(lambda z: ops.token_logprob(z, t), (x,))


def test_neg_inf_logits():
    x = _logits(3, 40)
    x[0, :30] = -math.inf  # masked vocabulary, target kept finite
    x[1, 5] = -math.inf  # target itself at -inf
    t = torch.tensor([35, 5, 2])
    xk = x.clone().requires_grad_()
    logp, ent = ops.token_logprob_entropy(xk, t)
    (logp.sum() + ent.sum()).backward()
    x64 = x.double().requires_grad_()
    ref_logp, ref_ent = _ref64(x64, t)
    (ref_logp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    assert logp[1] == -math.inf
    torch.testing.assert_close(xk.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_leading_dims_and_strided_rows():
    x = _logits(2 * 5, 33).view(2, 5, 33)[:, :-1]  # [B, S-1, V] slice: non-uniform row stride
    t = _targets(2 * 4, 33).view(2, 4)
    logp = ops.token_logprob(x, t)
    assert logp.shape == (2, 4)
    ref = reference.token_logprob_reference(x.reshape(-1, 33).double(), t.reshape(-1))
    torch.testing.assert_close(logp.reshape(-1).double(), ref, rtol=1e-5, atol=1e-5)


def test_empty_rows():
    logp, ent = ops.token_logprob_entropy(torch.zeros(0, 9), torch.zeros(0, dtype=torch.long))
    assert logp.shape == ent.shape == (0,)


@pytest.mark.parametrize("with_entropy", [True, False])
def test_opcheck_forward(with_entropy):
    x = _logits(4, 19).requires_grad_()
    torch.library.opcheck(torch.ops.openr1_mega.token_logprob_fwd.default,
                          (x, _targets(4, 19), 0.9, with_entropy))


def test_opcheck_partials_and_backward():
    x, t = _logits(4, 19), _targets(4, 19)
    torch.library.opcheck(torch.ops.openr1_mega.token_logprob_partials.default,
                          (x[:, 5:], t, 5, 1.0, True))
    _, lse, _ = torch.ops.openr1_mega.token_logprob_fwd(x, t, 1.0, False)
    coefs = (torch.randn(4), torch.randn(4), torch.randn(4))
    torch.library.opcheck(torch.ops.openr1_mega.token_logprob_bwd.default,
                          (x, t, 0, 1.0, lse, *coefs))
    torch.library.opcheck(torch.ops.openr1_mega.token_logprob_bwd_.default,
                          (x.clone(), t, 0, 1.0, lse, *coefs))


def test_partials_and_backward_match_reference():
    x, t = _logits(6, 50, torch.bfloat16), _targets(6, 50)
    got = torch.ops.openr1_mega.token_logprob_partials(x[:, 20:], t, 20, 0.8, True)
    want = reference.token_logprob_partials_reference(x[:, 20:], t, 20, 0.8, True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    lse = torch.logsumexp(x.float() / 0.8, -1)
    coefs = (torch.randn(6), torch.randn(6), torch.randn(6))
    got = torch.ops.openr1_mega.token_logprob_bwd(x[:, 20:], t, 20, 0.8, lse, *coefs)
    want = reference.token_logprob_backward_reference(x[:, 20:], t, 20, 0.8, lse, *coefs)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)  # bf16 rounding


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    v=st.integers(1, 300),
    temperature=st.floats(0.25, 4.0),
    scale=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference_and_bounds(n, v, temperature, scale, seed):
    x, t = _logits(n, v, scale=scale, seed=seed), _targets(n, v, seed=seed + 1)
    logp, ent = ops.token_logprob_entropy(x, t, temperature)
    ref_logp, ref_ent = _ref64(x, t, temperature)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    assert (logp <= 1e-6).all()
    assert (ent >= -1e-6).all() and (ent <= math.log(v) + 1e-5).all()


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda: ops.token_logprob(torch.zeros(2, 5), torch.tensor([0, 5])), "targets"),
        (lambda: ops.token_logprob(torch.zeros(2, 5), torch.tensor([0, -1])), "targets"),
        (lambda: ops.token_logprob(torch.zeros(2, 5), torch.tensor([0.0, 1.0])), "targets"),
        (lambda: ops.token_logprob(torch.zeros(2, 5), torch.tensor([0, 1, 2])), "targets"),
        (lambda: ops.token_logprob(torch.zeros(2, 5, dtype=torch.int32), torch.tensor([0, 1])),
         "logits"),
        (lambda: ops.token_logprob(torch.zeros(2, 0), torch.tensor([0, 1])), "logits"),
        (lambda: ops.token_logprob(torch.zeros(2, 5), torch.tensor([0, 1]), 0.0), "temperature"),
        (lambda: ops.token_logprob(torch.zeros(2, 5), torch.tensor([0, 1]), math.nan),
         "temperature"),
        (lambda: torch.ops.openr1_mega.token_logprob_fwd(torch.zeros(2, 5), torch.tensor([0, 9]),
                                                         1.0, False), "targets"),
        (lambda: torch.ops.openr1_mega.token_logprob_fwd(torch.zeros(5), torch.tensor([0]),
                                                         1.0, False), "logits"),
    ],
)
def test_errors_name_the_argument(call, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        call()


def test_meta_tensors_infer_shapes_through_the_fake_kernels():
    x = torch.empty(2, 3, 10, device="meta", dtype=torch.bfloat16)
    t = torch.empty(2, 3, device="meta", dtype=torch.long)
    logp, ent = ops.token_logprob_entropy(x, t)
    assert logp.shape == ent.shape == (2, 3) and logp.dtype == torch.float32
    assert ops.grpo_advantage(torch.empty(8, device="meta"), group_size=4).shape == (8,)
