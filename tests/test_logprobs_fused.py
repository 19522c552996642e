"""hidden_to_logprobs (hidden states -> output layer fused with token_logprob, no [B, S, V]
logits) gives today's logits path's values and gradients through a real Megatron GPTModel.

Reference: `logits_to_logprobs` on the logits of the same model's ordinary forward (already
checked against transformers and a float64 reference elsewhere). Each case runs both paths
on the same weights and batch with loss = sum(logp * w) for random per-token weights w, and
compares the log-probs and every parameter gradient of the rank (decoder, norms, embedding,
output layer): TP=1 and TP=2 (real gloo ranks), sequence parallel, temperature != 1, tied
and untied, a padded vocabulary (the tiny tokenizer's vocabulary is padded to 512 columns,
so at TP=2 rank 1's shard is mostly padding), and a PP=2 pipeline schedule under DDP.

Tolerance (fp32): both paths do the same arithmetic in a different order (the output matmul
per chunk of 16 tokens instead of once, the output weight's gradient summed over chunks), so
they differ by rounding only: a few fp32 ulps of values of order 1-10, well under 1e-5
relative; a wrong mask, temperature, shard offset or missing collective moves values by
1e-2 or more.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import _mcore_helpers as helpers
from tests._dist import run_world

SEQ = 38  # even: sequence parallel splits it over 2 ranks
CHUNK = 16  # tokens per fused chunk: several chunks, the last one partial
TOL = dict(rtol=1e-5, atol=1e-5)


def _case_inputs(vocab: int, seed: int):
    import torch

    ids = helpers.batch(vocab, seed, SEQ)
    weights = torch.rand(ids.shape[0], SEQ - 1, generator=torch.Generator().manual_seed(seed))
    return ids, ids[:, 1:], weights


def _grads(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        grad = getattr(p, "main_grad", None) if p.grad is None else p.grad
        out[name] = grad.detach().clone().numpy()
        p.grad = None
    return out


def _both_paths(model, ids, targets, weights, vocab, temperature) -> dict:
    """(logp, grads) of today's logits path and of the fused path on one model."""
    import torch

    from openr1_mega.models.hidden import forward_hidden
    from openr1_mega.train.logprobs import hidden_to_logprobs, logits_to_logprobs

    positions = torch.arange(SEQ).expand(ids.shape[0], -1)
    logits = model(ids, positions, None)
    old = logits_to_logprobs(logits[:, :-1], targets, vocab, temperature)
    (old * weights).sum().backward()
    old_grads = _grads(model)
    hidden = forward_hidden(model, ids, positions, None)
    new = hidden_to_logprobs(model, hidden, targets, vocab, temperature, chunk_size=CHUNK)
    (new * weights).sum().backward()
    return {"old": old.detach().numpy(), "new": new.detach().numpy(), "shape": tuple(new.shape),
            "old_grads": old_grads, "new_grads": _grads(model)}


def _layouts_worker(rank, world_size, root, cases):
    from openr1_mega.checkpoint.hf import load_hf_weights
    from openr1_mega.config import ParallelConfig, PrecisionConfig
    from openr1_mega.models.build import build_model, model_arch
    from openr1_mega.parallel.init import initialize

    results = {}
    for name, (tp, sp, tied, temperature) in cases.items():
        hf_dir = helpers.tiny(root, "qwen2", tied)
        parallel = ParallelConfig(tp=tp, sequence_parallel=sp)
        initialize(parallel)
        model = build_model(hf_dir, parallel, precision=PrecisionConfig(dtype="fp32"))
        load_hf_weights(model, hf_dir)
        arch = model_arch(model)
        ids, targets, weights = _case_inputs(arch.vocab_size, seed=len(results))
        result = _both_paths(model, ids, targets, weights, arch.vocab_size, temperature)
        result["padded"] = (arch.vocab_size, model.vocab_size)
        results[name] = result
    return results


def _assert_same(result: dict, what: str) -> None:
    assert result["shape"] == (2, SEQ - 1), f"{what}: logp shape {result['shape']}"
    vocab, padded = result["padded"]
    assert padded > vocab, f"{what}: the case must have padded vocab columns"
    np.testing.assert_allclose(result["new"], result["old"], err_msg=f"{what}: logp", **TOL)
    assert sorted(result["new_grads"]) == sorted(result["old_grads"])
    for name, want in result["old_grads"].items():
        assert np.abs(want).max() > 0, f"{what}: {name} got no gradient on the logits path"
        np.testing.assert_allclose(result["new_grads"][name], want,
                                   err_msg=f"{what}: grad of {name}", **TOL)


TP1_CASES = {"tp1-untied-T1": (1, False, False, 1.0), "tp1-tied-T0.7": (1, False, True, 0.7)}
TP2_CASES = {
    "tp2-untied-T0.7": (2, False, False, 0.7),
    "tp2-tied-T1": (2, False, True, 1.0),
    "tp2-sp-untied-T1": (2, True, False, 1.0),
    "tp2-sp-tied-T0.7": (2, True, True, 0.7),
}


def _write_models(root) -> None:
    """Both tiny models, written here once (the ranks only read them)."""
    for tied in (False, True):
        helpers.tiny(root, "qwen2", tied)


def test_tp1_matches_logits_path(tmp_path):
    _write_models(tmp_path)
    (results,) = run_world(_layouts_worker, tmp_path, TP1_CASES, world_size=1)
    for name in TP1_CASES:
        _assert_same(results[name], name)


@pytest.mark.slow
def test_tp2_and_sequence_parallel_match_logits_path(tmp_path):
    _write_models(tmp_path)
    per_rank = run_world(_layouts_worker, tmp_path, TP2_CASES, world_size=2)
    for rank, results in enumerate(per_rank):
        for name in TP2_CASES:
            _assert_same(results[name], f"{name} rank {rank}")
