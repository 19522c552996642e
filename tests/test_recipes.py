"""Every shipped recipe loads strictly and passes its dry run at the world it names; the dry
run's analytic per-rank parameter counts equal a real Megatron model's on every rank."""

from pathlib import Path

import pytest
import torch

from openr1_mega.config.load import load_config
from openr1_mega.models.tiny import TINY_CONFIGS
from openr1_mega.train import dry_run
from openr1_mega.train.grpo import GrpoRecipe
from openr1_mega.train.sft import SftRecipe
from tests._dist import run_world

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "recipes"
WORLD = {"qwen2.5_7b": 8, "qwen2.5_72b": 32, "qwen3_30b_a3b": 8, "qwen3_235b_a22b": 64,
         "tiny": 2, "demo": 1}
ALL = sorted(RECIPES.rglob("*.yaml"))
TINY_ARCH = {"grpo_moe.yaml": "qwen3_moe"}  # other tiny/demo recipes train a tiny Qwen2


def _cls(path):
    return SftRecipe if "sft" in path.name else GrpoRecipe


def _world(path):
    return 1 if path.parent.name == "tiny" and "sft" in path.name else WORLD[path.parent.name]


def _hf_config(arch: str, **overrides) -> dict:
    """A tiny architecture's config.json contents (no weights needed to count them)."""
    return {**TINY_CONFIGS[arch], "model_type": arch, "vocab_size": 393,
            "num_hidden_layers": 2, "max_position_embeddings": 4096, **overrides}


def _cpu_model_dir(tmp_path, path: Path) -> Path:
    """config.json of the model a tiny/demo recipe trains (the demo's own 512-token Qwen2)."""
    import json

    from openr1_mega.demo import MODEL

    arch = TINY_ARCH.get(path.name, "qwen2")
    config = {**MODEL, "vocab_size": 256} if path.parent.name == "demo" else _hf_config(arch)
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_loads(path):
    recipe = load_config(path, cls=_cls(path), world_size=_world(path),
                         on_cuda=path.parent.name not in ("tiny", "demo"))
    assert recipe.parallel.data_parallel_size(_world(path)) >= 1


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_passes_its_dry_run(path, tmp_path, capsys):
    """The CLI's --dry-run on every shipped recipe: the cluster recipes against the
    config.json shipped beside them, the CPU ones against a tiny model of their arch."""
    overrides = []
    if path.parent.name in ("tiny", "demo"):
        overrides = [f"model.path={_cpu_model_dir(tmp_path, path)}"]
    loop = SftRecipe if "sft" in path.name else GrpoRecipe
    entry = "openr1_mega.train.sft" if loop is SftRecipe else "openr1_mega.train.grpo"
    module = __import__(entry, fromlist=["main"])
    plan = module.main(["--recipe", str(path), "--dry-run", "--world-size", str(_world(path)),
                        *overrides])
    printed = capsys.readouterr().out
    assert printed.startswith(f"dry run: {path}") and "stage 0: layers 0-" in printed
    stages = plan["params_per_rank"]
    assert len(stages) == plan["layout"]["pp"]
    assert sum(s["layers"][1] - s["layers"][0] + 1 for s in stages) == plan["model"]["layers"]
    assert all(s["total"] > 0 for s in stages)
    assert not torch.distributed.is_initialized()  # built nothing: no process group


def test_dry_run_world_defaults_to_the_smallest_that_fits(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plan = dry_run.make_plan(RECIPES / "qwen3_235b_a22b" / "grpo.yaml", [], GrpoRecipe)
    assert plan["world_size"] == 64 and plan["layout"]["dp"] == 4  # tp4 x pp4 x (ep16 / tp4)
    monkeypatch.setenv("WORLD_SIZE", "128")
    assert dry_run.make_plan(RECIPES / "qwen3_235b_a22b" / "grpo.yaml", [], GrpoRecipe
                             )["layout"]["dp"] == 8


def test_235b_plan_splits_94_layers_and_counts_published_sizes():
    plan = dry_run.make_plan(RECIPES / "qwen3_235b_a22b" / "grpo.yaml", [], GrpoRecipe, 64)
    assert plan["layout"]["stage_layers"] == [23, 24, 24, 23] and plan["layout"]["dp"] == 4
    total = int(plan["model"]["params_total"].replace(",", ""))
    active = int(plan["model"]["params_active_per_token"].replace(",", ""))
    assert round(total / 1e9) == 235 and round(active / 1e9) == 22  # "235B-A22B"


def test_dry_run_refuses_a_bad_layout_naming_the_field():
    with pytest.raises(ValueError, match="arch.num_kv_heads=4 is not divisible by parallel.tp=8"):
        dry_run.make_plan(RECIPES / "qwen3_235b_a22b" / "grpo.yaml", ["parallel.tp=8"],
                          GrpoRecipe, 128)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="grpo.*unknown key.*stepz"):
        load_config(RECIPES / "tiny" / "grpo_moe.yaml", ["grpo.stepz=3"], cls=GrpoRecipe,
                    world_size=2)


def test_bad_value_is_named():
    with pytest.raises(ValueError, match="grpo.loss_type"):
        load_config(RECIPES / "tiny" / "grpo_moe.yaml", ["grpo.loss_type=ppo"], cls=GrpoRecipe,
                    world_size=2)
    with pytest.raises(ValueError, match="rollout.group_size"):
        load_config(RECIPES / "tiny" / "grpo_moe.yaml", ["rollout.group_size=1"], cls=GrpoRecipe,
                    world_size=2)


# ------------------------------------- analytic counts == a real Megatron model, per rank
COUNT_CASES = [
    ("qwen2", {"tie_word_embeddings": True}, {"tp": 2}),
    ("qwen2", {"tie_word_embeddings": True}, {"pp": 2}),
    ("qwen2", {"num_hidden_layers": 3}, {"pp": 2, "pp_last_stage_layers": 1}),
    ("qwen3", {}, {"tp": 2}),
    ("qwen2_moe", {}, {"tp": 2}),
    ("qwen2_moe", {}, {"ep": 2}),
    ("qwen3_moe", {}, {"tp": 2, "ep": 2, "etp": 1}),
    ("qwen3_moe", {"num_hidden_layers": 5, "mlp_only_layers": [1]},
     {"pp": 2, "pp_first_stage_layers": 2}),
]


def _count_on_rank(rank, world, cases):
    """Build each case on the meta device and count this rank's (dense, expert) params."""
    from megatron.core import parallel_state as ps

    from openr1_mega.config import ParallelConfig, PrecisionConfig
    from openr1_mega.models.build import build_model
    from openr1_mega.parallel.init import initialize

    out = []
    for hf, layout in cases:
        parallel = ParallelConfig(**layout)
        initialize(parallel)
        model = build_model(hf, parallel, precision=PrecisionConfig(dtype="fp32"), meta=True)
        expert = sum(p.numel() for n, p in model.named_parameters()
                     if ".experts.local_experts." in n)
        dense = sum(p.numel() for p in model.parameters()) - expert
        out.append((ps.get_pipeline_model_parallel_rank(), dense, expert))
    return out


@pytest.mark.slow
def test_analytic_counts_equal_megatron_on_every_rank():
    from openr1_mega.config import ParallelConfig
    from openr1_mega.models.archs import arch_config

    cases = [(_hf_config(arch, **extra), layout) for arch, extra, layout in COUNT_CASES]
    by_rank = run_world(_count_on_rank, cases, world_size=2)
    for i, (hf, layout) in enumerate(cases):
        want = dry_run.stage_params(arch_config(hf), ParallelConfig(**layout))
        assert {r[i][0] for r in by_rank} == set(range(len(want)))  # every stage was built
        for rank, results in enumerate(by_rank):
            stage, dense, expert = results[i]
            assert (dense, expert) == (want[stage].dense, want[stage].expert), \
                f"{hf['model_type']} {layout} rank {rank} (stage {stage})"
