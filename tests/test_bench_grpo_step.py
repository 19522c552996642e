"""tools/bench_grpo_step.py: phase shares, tokens/s from the metrics rows, and the train FLOPs
against a hand count. Our side only (TRL is an optional peer that `make test` never needs).

The cheap tests feed synthetic metrics rows; the last one runs 2 real GRPO steps (vLLM
rollouts, Megatron training) of the tiny dense recipe on a tiny Qwen2 made in tmp_path, on
one rank and with TP=2 on two torchrun ranks, and checks the bench's numbers against that
run's own metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from openr1_mega.models.archs import arch_config
from openr1_mega.models.tiny import TINY_CONFIGS, write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_grpo_step",
                                               ROOT / "tools" / "bench_grpo_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY_RECIPE = ROOT / "examples" / "recipes" / "tiny" / "grpo_dense.yaml"


def _hand_forward_flops(seq_lens, vocab: int) -> float:
    """The tiny Qwen2 (h=256, 4 heads of d=64, 2 KV heads, f=342, 2 layers), term by term."""
    h, heads, kv_heads, d, f, layers = 256, 4, 2, 64, 342, 2
    tokens = sum(seq_lens)
    q, kv = heads * d, kv_heads * d
    proj = 2 * (h * q + h * kv + h * kv + q * h) * tokens             # Q, K, V, O
    core = sum(2 * (d + d) * heads * s * (s + 1) / 2 for s in seq_lens)  # QK^T, AV (causal)
    mlp = 2 * (h * f + h * f + f * h) * tokens                        # gate, up, down
    return layers * (proj + core + mlp) + 2 * h * vocab * tokens        # + LM head


def _row(**times):
    return {"step": 1, "completion_length/mean": 3.0, "tokens_per_second": 1.0,
            **{f"time/{k}": v for k, v in times.items()}}


def test_phases_with_and_without_a_rewards_timer():
    old = bench.our_phases(_row(rollout=2.0, logprobs=0.5, train=3.0, sync=0.25))
    assert old == {"rollout": 2.0, "rewards": 0.0, "logprobs": 0.5, "train": 3.0, "sync": 0.25,
                   "other": 0.0}
    new = bench.our_phases(_row(rollout=1.5, rewards=0.5, logprobs=0.5, train=3.0,
                                sync=0.25, pack=0.1, step=6.0))
    assert new["rewards"] == 0.5 and new["rollout"] == 1.5
    # time/pack is unknown (-> other); time/step adds the uncovered rest to other
    assert new["other"] == pytest.approx(6.0 - (1.5 + 0.5 + 0.5 + 3.0 + 0.25))
    assert sum(new.values()) == pytest.approx(6.0)


def test_summary_skips_the_warm_up_and_shares_sum_to_one():
    arch = arch_config({**TINY_CONFIGS["qwen2"], "model_type": "qwen2", "vocab_size": 300,
                        "num_hidden_layers": 2, "max_position_embeddings": 512})
    records = [{"phases": dict(zip(bench.PHASES, [9.0, 0, 0, 9.0, 0, 0])),
                "generated_tokens": 1, "trained_tokens": 1, "seq_lens": [1]}]
    for k in (1, 2):
        records.append({"phases": dict(zip(bench.PHASES, [1.0 * k, 0.1, 0.2, 2.0, 0.05, 0.01])),
                        "generated_tokens": 40 * k, "trained_tokens": 100 * k,
                        "seq_lens": [30, 20 * k]})
    out = bench.summarize(records, arch, num_iterations=2, peak_tflops=1e-3)
    assert out["steps_measured"] == 2 and out["warmup_steps_skipped"] == 1
    assert math.fsum(out["phase_share"].values()) == pytest.approx(1.0, abs=1e-6)
    seconds = 2 * (0.1 + 0.2 + 2.0 + 0.05 + 0.01) + 1.0 + 2.0
    assert out["step_seconds"] == pytest.approx(seconds / 2)
    assert out["trained_tokens_per_second"] == pytest.approx(2 * 300 / seconds)
    assert out["generated_tokens_per_second"] == pytest.approx(120 / seconds)
    hand = 2 * 3 * (_hand_forward_flops([30, 20], 300) + _hand_forward_flops([30, 40], 300))
    assert out["train_flops_per_step"] == pytest.approx(hand / 2, rel=1e-12)
    assert out["train_tflops_per_device"] == pytest.approx(hand / 4.0 / 1e12, rel=1e-12)
    assert out["train_fraction_of_peak"] == pytest.approx(hand / 4.0 / 1e12 / 1e-3)


def test_the_trl_peer_names_what_it_cannot_run(tmp_path):
    recipe = bench.load_recipe(bench.parse_args(["--recipe", str(TINY_RECIPE),
                                                 "parallel.tp=1"]))
    with pytest.raises(ValueError, match="num_iterations=1"):
        bench.trl_spec(recipe, [], 1)
    args = bench.parse_args(["--peer", "trl", "--peer-python", str(tmp_path / "none")])
    with pytest.raises(FileNotFoundError, match="make bench-peers"):
        bench.run_trl(args, {}, tmp_path)


@pytest.mark.parametrize("nproc,layout", [
    pytest.param(1, ["parallel.tp=1"], id="one rank"),
    pytest.param(2, [], id="tp2 on two torchrun ranks", marks=pytest.mark.slow),
])
def test_two_real_steps_match_their_metrics_rows(tmp_path, nproc, layout):
    model = write_tiny_model(tmp_path / "model", "qwen2")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    work = tmp_path / "work"
    out = bench.main(["--recipe", str(TINY_RECIPE), "--steps", "2", "--model", str(model),
                      "--work-dir", str(work), "--out", str(tmp_path / "result.json"),
                      "--nproc", str(nproc), *layout])
    assert json.loads((tmp_path / "result.json").read_text()) == out
    ours = out["ours"]
    assert out["settings"]["devices"] == nproc
    assert ours["steps_measured"] == 1 and ours["warmup_steps_skipped"] == 1
    assert math.fsum(ours["phase_share"].values()) == pytest.approx(1.0, abs=1e-6)
    assert ours["phase_seconds"]["logprobs"] > 0   # the tiny recipe has beta > 0 and mu = 2

    rows = [r for r in map(json.loads, (work / "ours" / "metrics.jsonl").read_text()
                                       .splitlines()) if "time/train" in r]
    last = rows[-1]  # the measured step
    seconds = sum(last.get(f"time/{phase}", 0.0) for phase in bench.PHASES)
    tokens = last["tokens_per_second"] * seconds          # the loop's own token count
    assert ours["step_seconds"] == pytest.approx(seconds, rel=1e-9)
    assert ours["trained_tokens_per_second"] > 0
    assert ours["trained_tokens_per_second"] == pytest.approx(2 * tokens / seconds, rel=1e-6)
    generated = last["completion_length/mean"] * 4 * 4   # 4 prompts x G=4
    assert ours["generated_tokens_per_second"] == pytest.approx(generated / seconds, rel=1e-6)

    recipe = bench.load_recipe(bench.parse_args(["--recipe", str(TINY_RECIPE), "--nproc",
                                                 str(nproc), *layout]), model)
    prompts = bench.step_prompts(recipe, 2)[1]
    lens = [len(p["prompt_ids"]) + last["completion_length/mean"] for p in prompts
            for _ in range(4)]
    assert sum(lens) == pytest.approx(tokens, rel=1e-6)  # prompts + completions = the loop's
    hand = 2 * 3 * _hand_forward_flops(lens, vocab)      # mu = 2 passes of forward + backward
    assert ours["train_flops_per_step"] == pytest.approx(hand, rel=1e-9)  # all ranks together
    assert ours["train_tflops_per_device"] == pytest.approx(
        hand / ours["phase_seconds"]["train"] / nproc / 1e12, rel=1e-9)
    assert ours["trained_tokens_per_second_per_device"] == pytest.approx(
        ours["trained_tokens_per_second"] / nproc)
    assert 0 < ours["train_fraction_of_peak"]
