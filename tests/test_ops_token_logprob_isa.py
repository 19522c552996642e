"""token_logprob's CPU kernel on every SIMD level this CPU has, against float64 references.

OPENR1_MEGA_CPU_ISA (avx512 | avx2 | baseline) caps the level the kernels use at each call, so
an AVX-512 machine also runs the loops an AVX2-only or older x86 CPU takes (on the same
silicon: this checks the code path, not another machine). Levels above the CPU's are skipped.
Tolerances as in test_ops_token_logprob.py: 1e-5 for the fp32 outputs (the kernel's error on
the given, possibly 16-bit, inputs), one rounding of the gradient to its 16-bit dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from openr1_mega import ops
from openr1_mega.ops import reference

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason="extension not built")

ENV = "OPENR1_MEGA_CPU_ISA"
LEVELS = ("baseline", "avx2", "avx512")
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch):
    """Runs the test with the kernels capped at one level; skips levels this CPU lacks."""
    monkeypatch.delenv(ENV, raising=False)
    best = torch.ops.openr1_mega.cpu_isa()
    if LEVELS.index(request.param) > LEVELS.index(best):
        pytest.skip(f"{request.param} not supported by this CPU (best: {best})")
    monkeypatch.setenv(ENV, request.param)
    assert torch.ops.openr1_mega.cpu_isa() == request.param
    return request.param


def _check_against_float64(x, t, temperature):
    """Forward (logp, entropy) and the gradient of a mixed loss vs float64 autograd; logp <= 0."""
    g = torch.Generator().manual_seed(3)
    g_logp, g_ent = torch.randn(x.shape[0], generator=g), torch.randn(x.shape[0], generator=g)
    xk = x.clone().requires_grad_()
    logp, ent = ops.token_logprob_entropy(xk, t, temperature)
    (grad,) = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), xk)
    x64 = x.double().requires_grad_()
    ref_logp, ref_ent = reference.token_logprob_entropy_reference(x64, t, temperature)
    loss64 = (ref_logp * g_logp.double()).sum() + (ref_ent * g_ent.double()).sum()
    (ref_grad,) = torch.autograd.grad(loss64, x64)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    assert (logp <= 0).all()
    assert grad.dtype == x.dtype
    torch.testing.assert_close(grad.double(), ref_grad, rtol=GRAD_RTOL[x.dtype], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [1, 13, 1031, 4099])
def test_matches_float64(level, dtype, v):
    gen = torch.Generator().manual_seed(v)
    x = (torch.randn(3, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, v, (3,), generator=gen)
    _check_against_float64(x, t, 0.7)


def test_rising_max_and_masked_vocab(level):
    """Row maxima that rise by 40 a block (the kernel moves its sums to each new max), a spike,
    and a masked (-inf) vocabulary range, in fp32 and bf16."""
    v = 7000
    ramp = 40.0 * (torch.arange(v) // 1024) + 0.01 * (torch.arange(v) % 97)
    noise = torch.randn(v, generator=torch.Generator().manual_seed(0))
    x = torch.stack([ramp, ramp.flip(0), noise])
    x[0, 3000] = 300.0
    x[2, 100:5000] = -math.inf
    t = torch.tensor([3000, 6999, 5])
    for dtype in (torch.float32, torch.bfloat16):
        _check_against_float64(x.to(dtype), t, 1.0)


def test_unknown_level_names_the_variable(monkeypatch):
    monkeypatch.setenv(ENV, "sse9")
    with pytest.raises(ValueError, match=ENV):
        ops.token_logprob(torch.zeros(2, 5), torch.tensor([0, 1]))
