"""Shared-prompt attention equals causal attention over each prompt + completion alone."""

import pytest
import torch
import torch.nn.functional as F

from openr1_mega.models.shared_prompt import shared_prompt_attention, shared_prompt_params

ROWS = [(3, [2, 4, 1]), (5, [3]), (2, [1, 1])]  # (prompt tokens, completion tokens) per row
NUM_ROWS, WIDTH, HEADS, KV_HEADS, DIM = 4, 10, 4, 2, 8  # row 3 is padding


def _causal(q, k, v):
    """[L, heads, d] causal attention of one sequence, K/V heads repeated (GQA)."""
    rep = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(rep, dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)),
                                         is_causal=True, scale=0.3)
    return out.transpose(0, 1)


def _reference(q, k, v):
    """Outputs at every real token of the rows, each sequence (prompt + one completion) run
    on its own: {(row, position): [heads, d]}."""
    out = {}
    for r, (p, lengths) in enumerate(ROWS):
        start = p
        for n in lengths:
            idx = list(range(p)) + list(range(start, start + n))
            o = _causal(q[idx, r], k[idx, r], v[idx, r])
            for j, s in enumerate(idx):
                out[(r, s)] = o[j]
            start += n
    return out


def test_outputs_and_gradients_match_one_sequence_per_completion():
    check_against_separate_sequences("cpu")


def check_against_separate_sequences(device: str, tol: float = 1e-12) -> None:
    """float64 on `device` (tests/gpu runs it on CUDA): outputs, zero padding, gradients."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(WIDTH, NUM_ROWS, HEADS, DIM, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(WIDTH, NUM_ROWS, KV_HEADS, DIM, generator=gen, dtype=torch.float64)
            for _ in range(2))
    q, k, v = (x.to(device).requires_grad_(True) for x in (q, k, v))
    params = shared_prompt_params(ROWS, NUM_ROWS, WIDTH, device)
    got = shared_prompt_attention(q, k, v, params, scale=0.3).view(WIDTH, NUM_ROWS, HEADS, DIM)
    want = _reference(q, k, v)
    weights = {key: torch.randn(HEADS, DIM, generator=gen, dtype=torch.float64).to(device)
               for key in want}
    for (r, s), o in want.items():
        torch.testing.assert_close(got[s, r], o, rtol=tol, atol=tol)
    real = set(want)
    pads = [(s, r) for s in range(WIDTH) for r in range(NUM_ROWS) if (r, s) not in real]
    assert all(got[s, r].abs().sum() == 0 for s, r in pads)  # padding: zero output
    grads_got = torch.autograd.grad(sum((got[s, r] * w).sum() for (r, s), w in weights.items()),
                                    (q, k, v))
    grads_want = torch.autograd.grad(sum((want[key] * w).sum() for key, w in weights.items()),
                                     (q, k, v))
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_a_row_longer_than_the_width_is_refused():
    with pytest.raises(ValueError, match="longer than the width 4"):
        shared_prompt_params([(3, [2])], 1, 4)
