"""The CUDA kernels against the CPU kernels and the float64 pure-torch references, on a GPU.

Same inputs on both devices: the CUDA result equals the CPU kernel's within float32
rounding (both accumulate in float32 / float64), and its error against the float64
reference is at most 2x plain PyTorch's in the input dtype (flash-attention's rule).
torch.library.opcheck runs every op on CUDA tensors (schema, fake kernel, autograd
registration). Shapes are odd on purpose, and one vocab is Qwen's 151,936.
"""

from __future__ import annotations

import pytest
import torch

from openr1_mega import ops
from openr1_mega.ops import reference
from openr1_mega.ops._extension import use_kernel

CUDA = torch.device("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SHAPES = [(1, 7), (5, 13), (3, 1500), (7, 4099), (4, 151936)]


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    for op in ("token_logprob_fwd", "grpo_advantage"):
        assert use_kernel(op, CUDA), (
            f"openr1_mega::{op} has no CUDA kernel: build the extension with a CUDA torch and "
            "nvcc (`python setup.py build_ext --inplace`)")


def _logits(n, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dtype)


def _targets(n, v, seed=1):
    return torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))


def _err(x, ref):
    return (x.double().cpu() - ref.cpu()).abs().max().item()


@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_cpu_kernel_and_reference(n, v, dtype):
    x, t, temperature = _logits(n, v, dtype), _targets(n, v), 0.7
    cpu_logp, cpu_ent = ops.token_logprob_entropy(x, t, temperature)
    logp, ent = ops.token_logprob_entropy(x.to(CUDA), t.to(CUDA), temperature)
    assert logp.device.type == "cuda" and logp.dtype == cpu_logp.dtype
    torch.testing.assert_close(logp.cpu(), cpu_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.cpu(), cpu_ent, rtol=1e-5, atol=1e-5)
    ref_logp, ref_ent = reference.token_logprob_entropy_reference(x.double(), t, temperature)
    plain = torch.log_softmax(x.to(CUDA) / temperature, -1)  # in the input dtype
    plain_logp = plain.gather(-1, t.to(CUDA)[:, None])[:, 0]
    assert _err(logp, ref_logp) <= max(2 * _err(plain_logp, ref_logp), 1e-5)
    assert _err(ent, ref_ent) <= max(2 * _err(-(plain.exp() * plain).sum(-1), ref_ent), 1e-5)


@pytest.mark.parametrize("n,v", SHAPES[1:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_cpu_kernel(n, v, dtype):
    x, t = _logits(n, v, dtype), _targets(n, v)
    g_logp, g_ent = torch.randn(n), torch.randn(n)

    def grad(device):
        xd = x.to(device).requires_grad_()
        logp, ent = ops.token_logprob_entropy(xd, t.to(device), 0.9)
        (gx,) = torch.autograd.grad((logp * g_logp.to(device)).sum()
                                    + (ent * g_ent.to(device)).sum(), xd)
        return gx.float().cpu()

    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]  # bf16: one rounding of grad
    torch.testing.assert_close(grad(CUDA), grad("cpu"), rtol=tol, atol=1e-5)


def test_inplace_backward_matches_out_of_place_on_cuda():
    hidden = torch.randn(6, 64, device=CUDA, requires_grad=True)
    weight = torch.randn(4099, 64, device=CUDA).bfloat16().float().requires_grad_()
    t = _targets(6, 4099).to(CUDA)
    grads = []
    for inplace in (False, True):
        logits = (hidden @ weight.T).bfloat16()
        out = ops.token_logprob(logits, t, 0.9, inplace_backward=inplace)
        grads.append(torch.autograd.grad(out.sum(), (hidden, weight)))
    for plain, inplace in zip(*grads, strict=True):
        torch.testing.assert_close(plain, inplace, rtol=0, atol=0)


def test_partials_and_backward_ops_match_cpu():
    x, t = _logits(6, 1031, torch.bfloat16), _targets(6, 1031)
    cpu = torch.ops.openr1_mega.token_logprob_partials(x[:, 100:], t, 100, 0.8, True)
    got = torch.ops.openr1_mega.token_logprob_partials(x.to(CUDA)[:, 100:], t.to(CUDA), 100,
                                                        0.8, True)
    for g, c in zip(got, cpu, strict=True):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-5)
    _, lse, _ = torch.ops.openr1_mega.token_logprob_fwd(x, t, 1.0, False)
    coefs = (torch.randn(6), torch.randn(6), torch.randn(6))
    cpu = torch.ops.openr1_mega.token_logprob_bwd(x, t, 0, 1.0, lse, *coefs)
    got = torch.ops.openr1_mega.token_logprob_bwd(x.to(CUDA), t.to(CUDA), 0, 1.0, lse.to(CUDA),
                                                  *(c.to(CUDA) for c in coefs))
    torch.testing.assert_close(got.cpu().float(), cpu.float(), rtol=1e-2, atol=1e-5)


def test_kernels_run_on_the_current_stream():
    x, t = _logits(64, 4099, torch.bfloat16).to(CUDA), _targets(64, 4099).to(CUDA)
    want = ops.token_logprob(x, t)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ops.token_logprob(x, t)
    stream.synchronize()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("unbiased", [True, False])
def test_grpo_advantage_matches_cpu_kernel_and_reference(dtype, unbiased):
    g = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 4, (4099 * 8,), generator=g).to(dtype) / 3
    tokens = torch.randint(0, rewards.numel(), (50_000,), generator=g)
    mask = torch.rand(50_000, generator=g) > 0.3
    args = {"group_size": 8, "unbiased": unbiased}
    cpu = ops.grpo_advantage_stats(rewards, token_index=tokens, response_mask=mask, **args)
    got = ops.grpo_advantage_stats(rewards.to(CUDA), token_index=tokens.to(CUDA),
                                   response_mask=mask.to(CUDA), **args)
    for name in ("advantages", "token_advantages", "group_mean", "group_std",
                 "num_zero_std_groups"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(cpu, name), rtol=1e-6,
                                   atol=1e-6, msg=name)
    ref = reference.grpo_advantage_reference(rewards.double(), None, 8, rewards.numel() // 8,
                                             "group", 1e-6, unbiased, None, None)
    torch.testing.assert_close(got.advantages.double().cpu(), ref[0], rtol=1e-5, atol=1e-5)


def test_opcheck_on_cuda():
    x, t = _logits(4, 19, torch.float32).to(CUDA), _targets(4, 19).to(CUDA)
    lib = torch.ops.openr1_mega
    torch.library.opcheck(lib.token_logprob_fwd.default, (x.requires_grad_(), t, 0.9, True))
    x = x.detach()
    torch.library.opcheck(lib.token_logprob_partials.default, (x[:, 5:], t, 5, 1.0, True))
    _, lse, _ = lib.token_logprob_fwd(x, t, 1.0, False)
    coefs = tuple(torch.randn(4, device=CUDA) for _ in range(3))
    torch.library.opcheck(lib.token_logprob_bwd.default, (x, t, 0, 1.0, lse, *coefs))
    torch.library.opcheck(lib.token_logprob_bwd_.default, (x.clone(), t, 0, 1.0, lse, *coefs))
    r = torch.rand(24, device=CUDA)
    tokens, mask = torch.arange(30, device=CUDA) % 24, torch.arange(30, device=CUDA) % 3 > 0
    torch.library.opcheck(lib.grpo_advantage.default, (r, None, 8, 3, "group", 1e-6, True,
                                                       None, None))
    index = torch.arange(24, device=CUDA) % 5
    torch.library.opcheck(lib.grpo_advantage.default, (r.double(), index, 1, 5, "batch", 1e-6,
                                                       False, tokens, mask))
