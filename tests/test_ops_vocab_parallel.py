"""vocab_parallel_token_logprob(_entropy) on 2 gloo ranks equals the unsplit result.

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


def _rank_fn(rank, world_size, dtype):
    logits, targets, (g_logp, g_ent) = _inputs(dtype)
    start, stop = _shard_bounds(rank)
    shard = logits[:, start:stop].clone().requires_grad_()
    logp, ent = ops.vocab_parallel_token_logprob_entropy(shard, targets, start, dist.group.WORLD,
                                                         TEMPERATURE)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    only_logp = ops.vocab_parallel_token_logprob(shard.detach(), targets, start, None, TEMPERATURE)
    return logp, ent, shard.grad, only_logp


def _rank_bad_target(rank, world_size):
    logits, targets, _ = _inputs(torch.float32)
    start, stop = _shard_bounds(rank)
    targets[2] = V  # outside the global vocabulary: in no shard
    try:
        ops.vocab_parallel_token_logprob(logits[:, start:stop], targets, start, None)
    except ValueError as err:
        return str(err)
    return ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_ranks_equal_unsplit(dtype):
    results = run_world(_rank_fn, dtype, world_size=2)
    logits, targets, (g_logp, g_ent) = _inputs(dtype)
    full = logits.clone().requires_grad_()
    logp, ent = ops.token_logprob_entropy(full, targets, TEMPERATURE)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    ref_logp, ref_ent = reference.token_logprob_entropy_reference(logits.double(), targets,
                                                                  TEMPERATURE)
    grad = torch.cat([results[0][2], results[1][2]], dim=1)
    tol = dict(rtol=1e-5, atol=1e-5)
    for rank_logp, rank_ent, _, rank_only in results:
        torch.testing.assert_close(rank_logp.double(), ref_logp, **tol)
        torch.testing.assert_close(rank_ent.double(), ref_ent, **tol)
        torch.testing.assert_close(rank_logp, logp, **tol)
        torch.testing.assert_close(rank_only, rank_logp, rtol=0, atol=0)
    grad_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(grad, full.grad, **grad_tol)


def test_target_outside_every_shard_names_targets():
    messages = run_world(_rank_bad_target, world_size=2)
    assert all(m.startswith("targets:") for m in messages), messages


def test_negative_vocab_start_is_rejected():
    with pytest.raises(ValueError, match="^vocab_start"):
        ops.vocab_parallel_token_logprob(torch.zeros(2, 3), torch.tensor([0, 1]), -1, None)
