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
TOL = {"rtol": 1e-5, "atol": 1e-5}


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


def _pipeline_case(root, tied: bool, temperature: float) -> dict:
    """Build a PP=2 DDP model; run the schedule with the logits loss, then the fused one."""
    from openr1_mega.checkpoint.hf import load_hf_weights
    from openr1_mega.config import ParallelConfig, PrecisionConfig
    from openr1_mega.models.build import build_model, model_arch
    from openr1_mega.models.hidden import forward_hidden
    from openr1_mega.parallel.init import initialize
    from openr1_mega.train.logprobs import hidden_to_logprobs, logits_to_logprobs
    from openr1_mega.train.step import wrap_ddp

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
            out.append((ids, positions, lambda o, t=targets, w=weights: loss(o, t, w)))
        return out

    old = _pipeline_step(model, batches(logits_loss), lambda m, i, p: m(i, p, None))
    new = _pipeline_step(model, batches(hidden_loss),
                         lambda m, i, p: forward_hidden(m, i, p, None))
    return {"old": old, "new": new}


def _pipeline_worker(rank, world_size, root, temperature):
    return {tied: _pipeline_case(root, tied, temperature) for tied in (False, True)}


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


# ------------------------------------------------ the op alone: dtype, padding, empty shards
def _op_inputs(dtype, n=37, h=24, v=80, seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    return hidden.to(dtype), weight.to(dtype), torch.rand(n, generator=g, dtype=torch.float64)


def _reference_grads(hidden, weight, targets, coef, vocab, temperature):
    """float64 (logp, entropy, grad_hidden, grad_weight) of sum(coef (logp + 0.3 entropy)),
    computed on the real columns only (the padding rows of weight get no gradient)."""
    from openr1_mega.ops import reference

    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logp, ent = reference.token_logprob_entropy_reference(h @ w[:vocab].T, targets, temperature)
    (coef * (logp + 0.3 * ent)).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def test_bf16_fused_error_within_twice_torch_error():
    """bf16: the fused path's error against float64 is at most 2x plain PyTorch's (bf16 matmul,
    fp32 log-softmax) on the same inputs, padded vocab masked, entropy gradient included."""
    from openr1_mega import ops

    hidden, weight, coef = _op_inputs(torch.bfloat16)
    vocab, temperature = 71, 0.7
    targets = torch.randint(0, vocab, (hidden.shape[0],),
                            generator=torch.Generator().manual_seed(4))
    want = _reference_grads(hidden, weight, targets, coef, vocab, temperature)

    def fused(h, w):
        return ops.fused_linear_token_logprob_entropy(h, w, targets, temperature, 8,
                                                      vocab_size=vocab)

    def torch_path(h, w):
        z = (h @ w[:vocab].T).float() / temperature
        logp_all = torch.log_softmax(z, -1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        return logp_all.gather(-1, targets[:, None]).squeeze(-1), ent

    errors = {}
    for name, fn in (("fused", fused), ("torch", torch_path)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = fn(h, w)
        (coef.float() * (logp + 0.3 * ent)).sum().backward()
        got = (logp, ent, h.grad, w.grad)
        errors[name] = [float((g.detach().double() - r).abs().max())
                        for g, r in zip(got, want, strict=True)]
    for i, what in enumerate(("logp", "entropy", "grad hidden", "grad weight")):
        assert errors["fused"][i] <= 2 * errors["torch"][i] + 1e-6, (what, errors)


def _padded_shard_worker(rank, world_size, vocab, temperature):
    """Each rank holds 40 of 80 columns; with vocab 30, rank 1's shard is all padding."""
    from openr1_mega import ops

    hidden, weight, coef = _op_inputs(torch.float32)
    targets = torch.randint(0, vocab, (hidden.shape[0],),
                            generator=torch.Generator().manual_seed(4))
    local = weight.shape[0] // world_size
    h = hidden.clone().requires_grad_()
    w = weight[rank * local:(rank + 1) * local].clone().requires_grad_()
    logp, ent = ops.fused_linear_token_logprob_entropy(
        h, w, targets, temperature, 8, vocab_start=rank * local,
        group=torch.distributed.group.WORLD, vocab_size=vocab)
    (coef.float() * (logp + 0.3 * ent)).sum().backward()
    torch.distributed.all_reduce(h.grad)  # what the output layer's input mapping does
    want_logp, want_ent, want_h, want_w = _reference_grads(hidden, weight, targets, coef, vocab,
                                                           temperature)
    return [(got.detach().double().numpy(), want.numpy()) for got, want in (
        (logp, want_logp), (ent, want_ent), (h.grad, want_h),
        (w.grad, want_w[rank * local:(rank + 1) * local]))]


def test_vocab_parallel_with_an_all_padding_shard():
    for rank, pairs in enumerate(run_world(_padded_shard_worker, 30, 0.7, world_size=2)):
        for what, (got, want) in zip(("logp", "entropy", "grad hidden", "grad weight"), pairs,
                                     strict=True):
            assert np.isfinite(got).all(), f"rank {rank} {what}: not finite"
            np.testing.assert_allclose(got, want, err_msg=f"rank {rank} {what}", **TOL)
