"""vocab_parallel_token_logprob(_entropy) on 2 gloo ranks equals the unsplit result, and a
target outside every shard raises a ValueError naming `targets` on every rank.

Each rank builds the same full logits from a seed, keeps its vocab shard (uneven split, so
V is not divisible by the world size), and returns its log-probs, entropies and the gradient
of its shard; the parent compares them with the unsplit kernel op and the float64 reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from openr1_mega import ops
from openr1_mega.ops import reference
from tests._dist import run_world

N, V, SPLIT, TEMPERATURE = 6, 301, 137, 0.7


def _inputs(dtype):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    logits[0, :SPLIT] = float("-inf")  # rank 0's whole shard masked on one row
    targets = torch.tensor([SPLIT, 0, SPLIT - 1, V - 1, 200, 17])  # owned by both ranks
    upstream = (torch.randn(N, generator=g), torch.randn(N, generator=g))
    return logits, targets, upstream


def _shard_bounds(rank):
    return (0, SPLIT) if rank == 0 else (SPLIT, V)


def _rank_fn(rank, world_size, dtype, inplace):
    logits, targets, (g_logp, g_ent) = _inputs(dtype)
    start, stop = _shard_bounds(rank)
    shard = logits[:, start:stop].clone().requires_grad_()
    only_logp = ops.vocab_parallel_token_logprob(shard.detach(), targets, start, None, TEMPERATURE)
    logp, ent = ops.vocab_parallel_token_logprob_entropy(
        shard, targets, start, dist.group.WORLD, TEMPERATURE, inplace_backward=inplace
    )
    (grad,) = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), shard)
    assert (grad.data_ptr() == shard.data_ptr()) == inplace
    # plain lists: tests/_dist.py ships results through a torch.multiprocessing queue, whose
    # fd-shared tensors do not survive the worker's exit
    return [t.detach().float().tolist() for t in (logp, ent, grad, only_logp)] + [
        _bad_target_message(shard.detach(), targets, start)
    ]


def _bad_target_message(shard, targets, start):
    targets = targets.clone()
    targets[2] = V  # outside the global vocabulary: in no shard
    try:
        ops.vocab_parallel_token_logprob(shard, targets, start, None)
    except ValueError as err:
        return str(err)
    return ""


@pytest.mark.parametrize(
    "dtype, inplace", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
def test_two_ranks_equal_unsplit(dtype, inplace):
    results = run_world(_rank_fn, dtype, inplace, world_size=2)
    logits, targets, (g_logp, g_ent) = _inputs(dtype)
    full = logits.clone().requires_grad_()
    logp, ent = ops.token_logprob_entropy(full, targets, TEMPERATURE)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    ref_logp, ref_ent = reference.token_logprob_entropy_reference(logits.double(), targets,
                                                                  TEMPERATURE)
    assert all(r[4].startswith("targets:") for r in results), [r[4] for r in results]
    results = [[torch.tensor(x) for x in rank_result[:4]] for rank_result in results]
    grad = torch.cat([results[0][2], results[1][2]], dim=1).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5)
    for rank_logp, rank_ent, _, rank_only in results:
        torch.testing.assert_close(rank_logp.double(), ref_logp, **tol)
        torch.testing.assert_close(rank_ent.double(), ref_ent, **tol)
        torch.testing.assert_close(rank_logp, logp, **tol)
        torch.testing.assert_close(rank_only, rank_logp, rtol=0, atol=0)
    grad_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(grad, full.grad, **grad_tol)


def test_negative_vocab_start_is_rejected():
    with pytest.raises(ValueError, match="^vocab_start"):
        ops.vocab_parallel_token_logprob(torch.zeros(2, 3), torch.tensor([0, 1]), -1, None)
