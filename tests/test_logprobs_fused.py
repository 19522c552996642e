"""hidden_to_logprobs (hidden states -> output layer fused with token_logprob, no [B, S, V]
logits) gives today's logits path's values and gradients through a real Megatron GPTModel.

Reference: `logits_to_logprobs` on the logits of the same model's ordinary forward (already
checked against transformers and a float64 reference elsewhere). Each case runs both paths
on the same weights and batch with loss = sum(logp * w) for random per-token weights w, and
compares the log-probs, the entropies (against a float64 reference on the gathered logits)
and every parameter gradient of the rank (decoder, norms, embedding, output layer): TP=1 and
TP=2 (real gloo ranks), sequence parallel, temperature != 1, tied and untied, a padded
vocabulary (the tiny tokenizer's 393 tokens are padded to 512 columns, so at TP=2 rank 1's
shard [256, 512) is 119 columns of padding), and a PP=2 pipeline schedule under DDP.

Tolerance (fp32): both paths do the same arithmetic in a different order (the output matmul
per chunk of 16 tokens instead of once, the output weight's gradient summed over chunks), so
they differ by rounding only: a few fp32 ulps of values of order 1-10, well under 1e-5
relative; a wrong mask, temperature, shard offset or missing collective moves values by
1e-2 or more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import _mcore_helpers as helpers
from tests._dist import run_world

SEQ = 38  # even: sequence parallel splits it over 2 ranks
CHUNK = 16  # tokens per fused chunk: several chunks, the last one partial
TOL = dict(rtol=1e-5, atol=1e-5)


def _case_inputs(vocab: int, seed: int):
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
            "old_grads": old_grads, "new_grads": _grads(model),
            "entropy": _entropies(model, ids, positions, targets, vocab, temperature)}


@torch.no_grad()
def _entropies(model, ids, positions, targets, vocab, temperature) -> tuple:
    """(fused entropy, float64 reference on the TP-gathered logits' real columns), [B, T]."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from openr1_mega.models.hidden import forward_hidden
    from openr1_mega.ops import reference
    from openr1_mega.train.logprobs import hidden_to_logprobs_entropy

    hidden = forward_hidden(model, ids, positions, None)
    _, entropy = hidden_to_logprobs_entropy(model, hidden, targets, vocab, temperature, CHUNK)
    logits = gather_from_tensor_model_parallel_region(model(ids, positions, None))
    _, want = reference.token_logprob_entropy_reference(
        logits[:, :-1, :vocab].double(), targets, temperature)
    return entropy.numpy(), want.numpy()


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
    np.testing.assert_allclose(*result["entropy"], err_msg=f"{what}: entropy", **TOL)
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


def _pipeline_step(model, batches, loss_path) -> tuple[list, dict]:
    """One forward+backward of Megatron's PP schedule; the last stage's loss uses `loss_path`."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from openr1_mega.parallel.cpu_device import cuda_as_cpu

    logps = []

    def forward_step(data_iterator, chunk):
        ids, positions, run_loss = next(data_iterator)

        def loss_func(output):
            loss, logp = run_loss(output)
            logps.append(logp.detach().numpy())
            return loss, {"loss": loss.detach()}

        return loss_path(chunk, ids, positions), loss_func

    model.zero_grad_buffer()
    with cuda_as_cpu():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=2,
            forward_only=False)
    return logps, _grads(model)


def _pipeline_worker(rank, world_size, root, temperature):
    from openr1_mega.checkpoint.hf import load_hf_weights
    from openr1_mega.config import ParallelConfig, PrecisionConfig
    from openr1_mega.models.build import build_model, model_arch
    from openr1_mega.models.hidden import forward_hidden
    from openr1_mega.parallel.init import initialize
    from openr1_mega.train.logprobs import hidden_to_logprobs, logits_to_logprobs
    from openr1_mega.train.step import wrap_ddp

    results = {}
    for tied in (False, True):
        parallel = ParallelConfig(pp=2)
        initialize(parallel)
        hf_dir = helpers.tiny(root, "qwen2", tied)
        gpt = build_model(hf_dir, parallel, precision=PrecisionConfig(dtype="fp32"))
        load_hf_weights(gpt, hf_dir)
        model, vocab = wrap_ddp(gpt), model_arch(gpt).vocab_size
        positions = torch.arange(SEQ).expand(2, -1)

        def logits_loss(output, targets, weights):
            logp = logits_to_logprobs(output[:, :-1], targets, vocab, temperature)
            return (logp * weights).sum(), logp

        def hidden_loss(output, targets, weights):
            logp = hidden_to_logprobs(model, output, targets, vocab, temperature, CHUNK)
            return (logp * weights).sum(), logp

        def batches(loss):
            out = []
            for seed in (0, 1):
                ids, targets, weights = _case_inputs(vocab, seed)
                out.append((ids, positions,
                            lambda o, t=targets, w=weights: loss(o, t, w)))
            return out

        old = _pipeline_step(model, batches(logits_loss), lambda m, i, p: m(i, p, None))
        new = _pipeline_step(model, batches(hidden_loss), lambda m, i, p: forward_hidden(
            m, i, p, None))
        results[tied] = {"old": old, "new": new}
    return results


@pytest.mark.slow
def test_pipeline_parallel_schedule_under_ddp(tmp_path):
    """PP=2 (tied: the last stage's output weight mirrors stage 0's embedding): the last
    stage's loss function receives forward_hidden's output; every rank's grads match."""
    _write_models(tmp_path)
    per_rank = run_world(_pipeline_worker, tmp_path, 0.7, world_size=2)
    for rank, results in enumerate(per_rank):
        for tied, result in results.items():
            what = f"pp2 {'tied' if tied else 'untied'} rank {rank}"
            old_logps, old_grads = result["old"]
            new_logps, new_grads = result["new"]
            assert len(new_logps) == (2 if rank == 1 else 0), f"{what}: loss calls"
            for got, want in zip(new_logps, old_logps, strict=True):
                np.testing.assert_allclose(got, want, err_msg=f"{what}: logp", **TOL)
            assert sorted(new_grads) == sorted(old_grads)
            for name, want in old_grads.items():
                assert np.abs(want).max() > 0, f"{what}: {name} got no gradient"
                np.testing.assert_allclose(new_grads[name], want,
                                           err_msg=f"{what}: grad of {name}", **TOL)
