"""GRPO: one step's loss is the same under TP=1 and TP=2; an EP=2 MoE step runs; the loop
runs end to end with real vLLM rollouts and weight sync."""

import json

import pytest
import torch

from openr1_mega.models.tiny import write_tiny_model
from openr1_mega.rl.experience import micro_batches
from openr1_mega.rl.types import Completion
from tests._dist import run_world


def _completions(vocab: int) -> list[Completion]:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (5 + i,), generator=gen).tolist() for i in range(2)]
    out = []
    for i in range(6):
        prompt = prompts[i // 3]
        completion = torch.randint(3, vocab, (3 + i,), generator=gen).tolist()
        out.append(Completion(i // 3, prompt, completion, "", "stop",
                              logprobs=[-1.0] * len(completion)))
    return out


def _one_grpo_step(rank, world, hf_dir, tp, ep, loss_types=("grpo",), shared_prompt=False,
                   sequence_parallel=False, aux_loss=None):
    """One optimizer step per loss type from the same weights; the first type's metrics at
    the top level, every type's under `by_type`."""
    from megatron.core import parallel_state as ps

    from openr1_mega.checkpoint.hf import load_hf_weights
    from openr1_mega.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
    from openr1_mega.config.train import GrpoConfig, OptimConfig, RolloutConfig
    from openr1_mega.models.build import build_model
    from openr1_mega.parallel.init import initialize
    from openr1_mega.train.grpo import GrpoLoss
    from openr1_mega.train.step import build_optimizer, sequence_multiple, train_step, wrap_ddp

    parallel = ParallelConfig(tp=tp, ep=ep, sequence_parallel=sequence_parallel)
    initialize(parallel, seed=0)
    model = build_model(hf_dir, parallel, precision=PrecisionConfig(dtype="fp32"),
                        model=ModelConfig(attention_backend="sdpa", moe_aux_loss_coeff=aux_loss))
    ddp = wrap_ddp(model)
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    completions = _completions(vocab)
    advantages = torch.tensor([1.0, -0.5, 0.3, 0.7, 0.2, -0.7])  # sum 1: loss -1/6
    batches = micro_batches(completions, advantages, token_budget=40, pad_id=0,
                            rank=ps.get_data_parallel_rank(),
                            world=ps.get_data_parallel_world_size(),
                            width_multiple=sequence_multiple(model), shared_prompt=shared_prompt)
    by_type = {}
    for loss_type in loss_types:
        load_hf_weights(model, hf_dir)
        optimizer = build_optimizer(ddp, OptimConfig(lr=1e-3))
        loss = GrpoLoss.for_step(GrpoConfig(loss_type=loss_type, beta=0.0),
                                 RolloutConfig(max_tokens=16), vocab, len(completions), batches)
        metrics = train_step(ddp, optimizer, [(b, None, None) for b in batches],
                             loss.forward_step, lr=1e-3, metric_names=loss.metric_names,
                             shape=tuple(batches[0].input_ids.shape))
        by_type[loss_type] = {k: metrics[k] for k in ("loss", "grad_norm", "neg_logprob")}
    after = loss.logprobs(ddp, batches)  # batch position -> its tokens' log-probs after the step
    logprobs = {int(i): lp[k][:int(b.mask[k].sum())].tolist()
                for b, lp in zip(batches, after) for k, i in enumerate(b.index)}
    return {**by_type[loss_types[0]], "by_type": by_type, "micro_batches": len(batches),
            "logprobs": logprobs}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    return {arch: write_tiny_model(root / arch, arch) for arch in ("qwen2", "qwen3_moe")}


def test_tp2_step_equals_tp1(tiny):
    tp1 = run_world(_one_grpo_step, tiny["qwen2"], 1, 1, world_size=1)[0]
    tp2 = run_world(_one_grpo_step, tiny["qwen2"], 2, 1, world_size=2)
    assert tp1["micro_batches"] > 1  # the loss is summed over several micro-batches
    for rank in tp2:
        assert rank["loss"] == pytest.approx(tp1["loss"], rel=1e-5, abs=1e-7)
        assert rank["grad_norm"] == pytest.approx(tp1["grad_norm"], rel=1e-4)
    # on-policy (mu = 1) the grpo loss is -mean(advantages) = -1/6
    assert tp1["loss"] == pytest.approx(-1 / 6, rel=1e-6) and tp1["grad_norm"] > 0


def test_moe_ep2_step_runs_and_matches_ep1(tiny):
    ep1 = run_world(_one_grpo_step, tiny["qwen3_moe"], 1, 1, ("grpo",), False, False, 0.0,
                    world_size=1)[0]
    ep2 = run_world(_one_grpo_step, tiny["qwen3_moe"], 1, 2, ("grpo",), False, False, 0.0,
                    world_size=2)
    # EP=2 means DP=2: each rank trains on half the completions; the logged loss is the
    # step's global value on every rank and the gradient norm equals the single-rank step's.
    # The load-balancing loss is off: Megatron computes it per rank's micro-batch, so its
    # gradient legitimately depends on how the tokens are split.
    for rank in ep2:
        assert rank["loss"] == pytest.approx(ep1["loss"], rel=1e-5)
        assert rank["grad_norm"] == pytest.approx(ep1["grad_norm"], rel=1e-4)


def test_every_loss_type_dp2_equals_dp1(tiny):
    """Each data-parallel rank holds half the completions; the step's loss, gradient norm
    and token-mean metrics must be the full batch's (bnpo was N_dp times too large)."""
    types = ("grpo", "bnpo", "dr_grpo", "dapo")
    dp1 = run_world(_one_grpo_step, tiny["qwen2"], 1, 1, types, world_size=1)[0]["by_type"]
    dp2 = run_world(_one_grpo_step, tiny["qwen2"], 1, 1, types, world_size=2)
    for rank in dp2:
        for loss_type in types:
            for key, want in dp1[loss_type].items():
                assert rank["by_type"][loss_type][key] == pytest.approx(want, rel=1e-5), \
                    (loss_type, key)
    # bnpo and dapo: one token mean over the whole step (all ranks): -sum(A_b n_b) / sum(n_b)
    assert dp1["bnpo"]["loss"] == pytest.approx(dp1["dapo"]["loss"], rel=1e-6)


@pytest.mark.parametrize("arch, tp, sp", [("qwen2", 1, False), ("qwen2", 2, True),
                                          ("qwen3_moe", 1, False)])
def test_shared_prompt_step_equals_one_row_per_completion(tiny, arch, tp, sp):
    """A prompt computed once for its completions (mask + RoPE positions) gives the step's
    loss, gradient norm and, after the update, every token's log-prob as one row per
    completion does (fp32; the attention sums run over other key sets, hence 1e-5). The MoE
    load-balancing loss is off: it counts the tokens routed, and a shared prompt is routed
    once instead of G times (a different, intended, balance term)."""
    plain = run_world(_one_grpo_step, tiny[arch], tp, 1, ("dapo",), False, sp, 0.0,
                      world_size=tp)[0]
    shared = run_world(_one_grpo_step, tiny[arch], tp, 1, ("dapo",), True, sp, 0.0,
                       world_size=tp)[0]
    assert shared["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert shared["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    assert sorted(shared["logprobs"]) == sorted(plain["logprobs"]) == list(range(6))
    for i, want in plain["logprobs"].items():
        assert shared["logprobs"][i] == pytest.approx(want, abs=1e-5), i
