"""tools/plan.py: memory terms by hand, the published runs fit, an impossible layout does not."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from openr1_mega.models.archs import arch_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("plan", ROOT / "tools" / "plan.py")
plan = sys.modules.setdefault("plan", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(plan)

GIB = 2**30
TINY = dict(model_type="qwen3", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, intermediate_size=342, num_hidden_layers=2, vocab_size=1000,
            max_position_embeddings=512, tie_word_embeddings=False)


def test_weights_grads_optimizer_by_hand():
    """Tiny Qwen3 on 2 GPUs (DP=2): every parameter counted by hand, then x2 / x4 / x12/DP."""
    arch = arch_config(TINY)
    per_layer = (128 * (256 + 128 + 128)   # q, k, v projections
                 + 256 * 128               # output projection
                 + 2 * 128                 # input and pre-MLP RMSNorm
                 + 2 * 64                  # q and k head norms (Qwen3)
                 + 3 * 128 * 342)          # gate, up, down
    vocab = 1024 * 128                     # 1000 rows padded to a multiple of 128
    params = 2 * per_layer + 2 * vocab + 128   # + embedding, LM head, final norm
    assert params == 722_304
    work = plan.Workload(sequences=4, mean_seq_len=64, micro_batch_tokens=128)
    mem = plan.training_memory(arch, plan.Layout(), work, gpus=2)
    assert mem["weights"] == 2 * params
    assert mem["gradients"] == 4 * params
    assert mem["optimizer"] == 12 * params / 2


def test_experts_shard_over_ep_and_their_optimizer_over_expert_dp():
    """Tiny Qwen3-MoE, EP=2 on 4 GPUs: experts split in two, their optimizer over EDP=2."""
    arch = arch_config(dict(TINY, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=96))
    experts = 2 * 8 * 3 * 128 * 96                  # 2 layers x 8 experts x gate/up/down
    dense = 2 * (128 * 512 + 256 * 128 + 256 + 128 + 128 * 8) + 2 * 1024 * 128 + 128
    work = plan.Workload(sequences=4, mean_seq_len=64, micro_batch_tokens=128)
    mem = plan.training_memory(arch, plan.Layout(ep=2), work, gpus=4)
    assert mem["weights"] == 2 * (dense + experts / 2)
    assert mem["optimizer"] == 12 * (dense / 4 + (experts / 2) / 2)


def test_activations_scale_with_tokens_and_full_recompute_keeps_layer_inputs():
    arch = arch_config(TINY)
    lay = plan.Layout()
    small = plan.Workload(sequences=1, mean_seq_len=128, micro_batch_tokens=128)
    big = plan.Workload(sequences=1, mean_seq_len=256, micro_batch_tokens=256)
    full = plan.Workload(sequences=1, mean_seq_len=256, micro_batch_tokens=256, recompute="full")
    act = [plan.training_memory(arch, lay, w, 1)["activations"] for w in (small, big, full)]
    assert act[1] == 2 * act[0]
    # full: 2 bytes x hidden per token per layer, plus one layer's activations.
    assert act[2] == 256 * 2 * 128 * 2 + act[1] / 2


def test_stage_layers_uneven_split():
    assert plan.stage_layers(94, plan.Layout(pp=8, pp_first_stage_layers=11,
                                             pp_last_stage_layers=11)) == [11] + [12] * 6 + [11]
    assert plan.stage_layers(80, plan.Layout(pp=8)) == [10] * 8
    with pytest.raises(ValueError, match="parallel.pp_first_stage_layers"):
        plan.stage_layers(94, plan.Layout(pp=4))


def test_published_runs_fit():
    rows = plan.validate()
    assert len(rows) >= 4
    for row in rows:
        assert row["verdict"] == "fits", row
        assert any(key in row for key in ("tokens_per_s_per_gpu", "s_per_step"))


def test_impossible_layout_does_not_fit():
    """Qwen2.5-72B with TP=PP=1 on one 8-GPU node: 72B params x 18 bytes cannot fit."""
    recipe = ROOT / "examples" / "recipes" / "qwen2.5_72b" / "grpo.yaml"
    arch, lay, work = plan.recipe_plan_inputs(recipe, 0.5)
    lay.tp = lay.pp = 1
    lay.sequence_parallel = False
    result = plan.plan(arch, lay, work, "h100", 8)
    assert result.verdict.startswith("does not fit by ")
    shortfall = float(result.verdict.split()[-2])
    assert shortfall == pytest.approx(result.peak_gib - 79.6, abs=0.05) and shortfall > 500


def test_cli_validate_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert plan.main(["--validate", "--json", str(out)]) == 0
    assert "| run |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["assumptions"]["mfu_dense"] == plan.MFU_DENSE and len(data["runs"]) >= 4
