"""Strict recipe loading, field validation, and the one translation to TransformerConfig."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from openr1_mega.config import (
    ArchConfig,
    Config,
    ModelConfig,
    MoEArch,
    ParallelConfig,
    PrecisionConfig,
    from_dict,
    load_config,
    to_dict,
)
from openr1_mega.config.layout import stage_layers, stage_offsets
from openr1_mega.config.to_megatron import transformer_config


def _write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_nested_dataclasses(tmp_path):
    path = _write(tmp_path, "model:\n  path: /m\nparallel:\n  tp: 2\n  sequence_parallel: true\n")
    cfg = load_config(path, ["precision.dtype=fp32", "parallel.ep=2", "model.moe_aux_loss_coeff=0"],
                      world_size=4)
    assert cfg.model.path == "/m" and cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel
    assert cfg.precision.dtype == "fp32" and cfg.parallel.ep == 2
    assert cfg.model.moe_aux_loss_coeff == 0.0 and isinstance(cfg.model.moe_aux_loss_coeff, float)
    assert from_dict(Config, to_dict(cfg)) == cfg


@pytest.mark.parametrize("text, override, message", [
    ("parallel:\n  tpp: 2\n", None, r"parallel: unknown key\(s\) \['tpp'\]"),
    ("modle: {}\n", None, r"unknown key\(s\) \['modle'\]"),
    ("", "parallel.tp=two", r"parallel.tp: expected int"),
    ("", "parallel.tp=true", r"parallel.tp: expected int, got a boolean"),
    ("", "parallel.tp=0", r"parallel.tp=0: expected a positive integer"),
    ("", "precision.dtype=fp8", r"precision.dtype='fp8': expected one of"),
    ("", "model.attention_backend=flash", r"model.attention_backend='flash'"),
    ("", "parallel.sequence_parallel=true", r"sequence_parallel=True needs parallel.tp > 1"),
    ("", "bad", r"expected dotted.key=value"),
])
def test_bad_recipes_name_the_key(tmp_path, text, override, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        load_config(path, [override] if override else [])


def test_data_parallel_size_checks_the_world():
    assert ParallelConfig(tp=2, pp=2).data_parallel_size(8) == 2
    with pytest.raises(ValueError, match=r"not divisible by parallel.tp\*pp\*cp=2\*2\*1=4"):
        ParallelConfig(tp=2, pp=2).data_parallel_size(6)
    with pytest.raises(ValueError, match=r"parallel.ep\*etp=4\*1=4 must divide"):
        ParallelConfig(ep=4).data_parallel_size(2)
    assert ParallelConfig(tp=2, ep=2, etp=1).data_parallel_size(2) == 1


def _moe_arch(norm_topk_prob: bool, shared: int | None) -> ArchConfig:
    moe = MoEArch(num_experts=8, topk=2, ffn_hidden_size=96, norm_topk_prob=norm_topk_prob,
                  layer_pattern=(0, 1, 1), aux_loss_coeff=0.001,
                  shared_expert_ffn_hidden_size=shared, shared_expert_gate=shared is not None)
    return ArchConfig(arch="qwen3_moe", vocab_size=393, hidden_size=128, num_layers=3,
                      num_attention_heads=4, num_kv_heads=2, head_dim=64, ffn_hidden_size=342,
                      norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
                      qkv_bias=False, qk_norm=True, tie_word_embeddings=False, moe=moe)


def test_translation_to_transformer_config():
    tc = transformer_config(_moe_arch(True, None), ParallelConfig(tp=2, ep=2, etp=1),
                            PrecisionConfig(dtype="bf16"), on_cuda=False)
    assert (tc.num_query_groups, tc.kv_channels, tc.qk_layernorm, tc.add_qkv_bias) == \
        (2, 64, True, False)
    assert tc.gated_linear_unit and tc.normalization == "RMSNorm" and not tc.add_bias_linear
    assert tc.params_dtype == torch.bfloat16 and tc.bf16 and tc.use_cpu_initialization
    assert (tc.tensor_model_parallel_size, tc.expert_model_parallel_size,
            tc.expert_tensor_parallel_size) == (2, 2, 1)
    # norm_topk_prob -> softmax over the top-k logits; otherwise softmax then top-k
    assert tc.moe_router_pre_softmax is False and tc.moe_layer_freq == [0, 1, 1]
    assert tc.moe_token_dispatcher_type == "allgather" and tc.moe_aux_loss_coeff == 0.001
    qwen2_moe = transformer_config(_moe_arch(False, 160), ParallelConfig(),
                                   PrecisionConfig(dtype="fp32"), on_cuda=False)
    assert qwen2_moe.moe_router_pre_softmax and qwen2_moe.moe_shared_expert_gate
    assert qwen2_moe.moe_shared_expert_intermediate_size == 160


def test_translation_refuses_what_cpu_or_local_spec_cannot_do():
    arch = _moe_arch(True, None)
    with pytest.raises(ValueError, match="alltoall needs CUDA"):
        transformer_config(arch, ParallelConfig(), PrecisionConfig(),
                           ModelConfig(moe_token_dispatcher="alltoall"), on_cuda=False)
    with pytest.raises(ValueError, match="fp8 needs Transformer Engine"):
        transformer_config(arch, ParallelConfig(), PrecisionConfig(fp8="e4m3"), on_cuda=True)


def test_uneven_pipeline_fields_reach_megatron():
    arch = dataclasses.replace(_moe_arch(True, None), num_layers=5,
                               moe=dataclasses.replace(_moe_arch(True, None).moe,
                                                       layer_pattern=(1,) * 5))
    parallel = ParallelConfig(pp=3, pp_first_stage_layers=1, pp_last_stage_layers=2)
    tc = transformer_config(arch, parallel, PrecisionConfig(dtype="fp32"), on_cuda=False)
    assert (tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage) == \
        (1, 2)
    assert stage_layers(5, parallel) == [1, 2, 2] and stage_offsets(5, parallel) == [0, 1, 3]


@pytest.mark.parametrize("layout, layers, want", [
    (dict(pp=4), 8, [2, 2, 2, 2]),
    (dict(pp=4, pp_first_stage_layers=23, pp_last_stage_layers=23), 94, [23, 24, 24, 23]),
    (dict(pp=2, pp_first_stage_layers=2), 5, [2, 3]),
    (dict(pp=3, pp_last_stage_layers=1), 5, [2, 2, 1]),
    (dict(pp=2, pp_first_stage_layers=1, pp_last_stage_layers=4), 5, [1, 4]),
])
def test_stage_layers_follow_megatron(layout, layers, want):
    """Our split equals Megatron's own get_num_layers_to_build / layer offset per stage."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    parallel = ParallelConfig(**layout)
    arch = dataclasses.replace(_moe_arch(True, None), num_layers=layers, moe=None)
    tc = transformer_config(arch, parallel, PrecisionConfig(dtype="fp32"), on_cuda=False)
    assert stage_layers(layers, parallel) == want
    assert [get_num_layers_to_build(tc, pp_rank=r) for r in range(parallel.pp)] == want
    assert [get_transformer_layer_offset(tc, pp_rank=r) for r in range(parallel.pp)] == \
        stage_offsets(layers, parallel)


# ------------------------------------------------- whole-recipe validation at load time
TINY_QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=393, hidden_size=128,
                      intermediate_size=342, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=96, max_position_embeddings=4096)
BASE_GRPO = "grpo:\n  rewards: {accuracy: 1.0}\nmodel: {path: does-not-exist}\n"


def _grpo_dir(tmp_path, **arch_overrides):
    """A recipe directory with a tiny Qwen3-MoE config.json shipped beside the recipe."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY_QWEN3_MOE, **arch_overrides}))
    return _write(tmp_path, BASE_GRPO)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=3"], 3, r"arch.num_attention_heads=4 is not divisible by parallel.tp=3"),
    (["parallel.tp=4"], 4, r"arch.num_kv_heads=2 is not divisible by parallel.tp=4"),
    (["parallel.ep=16"], 16, r"moe.num_experts=8 is not divisible by parallel.ep=16"),
    (["parallel.tp=2"], 3, r"world size 3 is not divisible by parallel.tp\*pp\*cp=2\*1\*1"),
    (["parallel.pp=2", "parallel.ep=4"], 4,
     r"parallel.ep\*etp=4\*1=4 must divide world size / parallel.pp = 2"),
    (["parallel.pp=2"], 2, r"arch.num_layers=5 is not divisible by parallel.pp=2; set "
                           r"parallel.pp_first_stage_layers / parallel.pp_last_stage_layers"),
    (["parallel.pp=3", "parallel.pp_first_stage_layers=2"], 3,
     r"parallel.pp_first_stage_layers=2 leave 3 of arch.num_layers=5, not divisible by the 2"),
    (["parallel.pp=2", "parallel.pp_first_stage_layers=3", "parallel.pp_last_stage_layers=3"],
     2, r"pp_first_stage_layers=3 and parallel.pp_last_stage_layers=3 leave -1"),
    (["parallel.pp_first_stage_layers=2"], 1, r"need parallel.pp > 1"),
    (["grpo.rewards={acuracy: 1.0}"], 1, r"grpo.rewards: unknown reward\(s\) \['acuracy'\]"),
    (["grpo.reward_params={accuracy: {wrkers: 2}}"], 1,
     r"grpo.reward_params.accuracy: unknown option\(s\) \['wrkers'\]"),
    (["rollout.group_size=1", "grpo.advantage_scale=group"], 1, r"rollout.group_size=1"),
    (["rollout.max_tokens=4000"], 1, r"data.max_prompt_tokens=512 \+ rollout.max_tokens=4000 "
                                     r"= 4512 exceeds the model's context "
                                     r"arch.max_position_embeddings=4096"),
    (["grpo.stepz=3"], 1, r"grpo: unknown key\(s\) \['stepz'\]"),
    (["model.moe_token_dispatcher=alltoall"], 1, r"moe_token_dispatcher=alltoall needs CUDA"),
])
def test_bad_combinations_fail_at_load_naming_the_fields(tmp_path, overrides, world, message):
    from openr1_mega.train.grpo import GrpoRecipe

    recipe = _grpo_dir(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_config(recipe, overrides, GrpoRecipe, world_size=world, on_cuda=False)
    assert not torch.distributed.is_initialized()  # failed before any process group


def test_valid_recipe_loads_with_uneven_stages_and_world_from_env(tmp_path, monkeypatch):
    from openr1_mega.train.grpo import GrpoRecipe

    recipe = _grpo_dir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = load_config(recipe, ["parallel.pp=2", "parallel.pp_first_stage_layers=2",
                               "parallel.ep=2"], GrpoRecipe, on_cuda=False)
    assert cfg.parallel.data_parallel_size(4) == 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3 is not divisible"):
        load_config(recipe, ["parallel.pp=2", "parallel.pp_first_stage_layers=2"], GrpoRecipe)


def test_model_path_config_wins_over_the_shipped_one(tmp_path):
    from openr1_mega.train.grpo import GrpoRecipe

    recipe = _grpo_dir(tmp_path, num_hidden_layers=6)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_QWEN3_MOE))  # 5 layers
    load_config(recipe, ["parallel.pp=2"], GrpoRecipe, world_size=2, on_cuda=False)  # 6 ok
    with pytest.raises(ValueError, match="arch.num_layers=5"):
        load_config(recipe, ["parallel.pp=2", f"model.path={model}"], GrpoRecipe,
                    world_size=2, on_cuda=False)


def test_sft_sequences_and_rows_are_checked(tmp_path):
    from openr1_mega.train.sft import SftRecipe

    (tmp_path / "config.json").write_text(json.dumps(TINY_QWEN3_MOE))
    recipe = _write(tmp_path, "sft: {seq_length: 512, rows_per_step: 3}\n")
    load_config(recipe, [], SftRecipe, world_size=1, on_cuda=False)
    with pytest.raises(ValueError, match=r"sft.seq_length=8192 exceeds the model's context "
                                         r"arch.max_position_embeddings=4096"):
        load_config(recipe, ["sft.seq_length=8192"], SftRecipe, world_size=1, on_cuda=False)
    with pytest.raises(ValueError, match=r"sft.rows_per_step=3 is not a multiple of the "
                                         r"data-parallel size 2"):
        load_config(recipe, [], SftRecipe, world_size=2, on_cuda=False)


def test_one_temperature_for_sampling_and_trainer_logprobs():
    """A GRPO recipe has one sampling temperature, rollout.temperature, and the trainer's
    log-probs use it: there is no second one that could drift from the sampler's
    (grpo.eval_temperature only samples the held-out pass@1, no log-probs)."""
    import re
    from pathlib import Path

    from openr1_mega.train import grpo

    fields = {f"{section.name}.{f.name}" for section in dataclasses.fields(grpo.GrpoRecipe)
              for f in dataclasses.fields(section.type if isinstance(section.type, type)
                                          else getattr(grpo, section.type))
              if "temperature" in f.name}
    assert fields == {"rollout.temperature", "grpo.eval_temperature"}
    used = set(re.findall(r"\b[\w.]*temperature\b", Path(grpo.__file__).read_text()))
    assert "r.temperature" in used and "eval_temperature" not in used, used


def test_config_does_not_import_rl():
    import subprocess
    import sys

    code = ("import sys, openr1_mega.config, openr1_mega.config.train, openr1_mega.config.validate;"
            "print(sorted(m for m in sys.modules if m.startswith('openr1_mega.rl')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
    from openr1_mega.config.train import LOSS_TYPES
    from openr1_mega.rl import losses

    assert losses.LOSS_TYPES is LOSS_TYPES


def test_build_validate_layout_accepts_uneven_splits_and_names_the_fields():
    from openr1_mega.models.build import validate_layout

    arch = dataclasses.replace(_moe_arch(True, None), num_layers=5, moe=None)
    validate_layout(arch, ParallelConfig(pp=2, pp_first_stage_layers=2))
    validate_layout(arch, ParallelConfig(pp=3, pp_first_stage_layers=1, pp_last_stage_layers=2))
    with pytest.raises(ValueError, match=r"parallel.pp_first_stage_layers=5 leave 0 of "
                                         r"arch.num_layers=5 for 1 middle stage"):
        validate_layout(arch, ParallelConfig(pp=2, pp_first_stage_layers=5))
    with pytest.raises(ValueError, match=r"arch.num_layers=5 is not divisible by parallel.pp=2"):
        validate_layout(arch, ParallelConfig(pp=2))


def test_shared_prompt_needs_sdpa_and_one_stage(tmp_path):
    """grpo.shared_prompt fails at load naming the fields when the layout cannot run it."""
    from openr1_mega.config.schema import ModelConfig, ParallelConfig
    from openr1_mega.config.train import GrpoConfig
    from openr1_mega.config.validate import validate_recipe
    from openr1_mega.models.archs import arch_config
    from openr1_mega.models.tiny import write_tiny_model
    from openr1_mega.train.grpo import GrpoRecipe

    arch = arch_config(write_tiny_model(tmp_path / "m", "qwen2"))
    shared = GrpoConfig(shared_prompt=True)
    validate_recipe(GrpoRecipe(grpo=shared, model=ModelConfig(attention_backend="sdpa")), 2,
                    arch, on_cuda=False)
    with pytest.raises(ValueError, match=r"grpo.shared_prompt needs model.attention_backend="
                                         r"sdpa \(got auto, which resolves to Transformer"):
        validate_recipe(GrpoRecipe(grpo=shared), 8, arch, on_cuda=True)
    with pytest.raises(ValueError, match=r"needs parallel.pp=1 and parallel.cp=1 \(got pp=2"):
        validate_recipe(GrpoRecipe(grpo=shared, parallel=ParallelConfig(pp=2),
                                   model=ModelConfig(attention_backend="sdpa")), 2, arch,
                        on_cuda=False)
