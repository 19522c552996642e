"""Every shipped recipe loads strictly, and its layout fits the world it names."""

from pathlib import Path

import pytest

from openr1_mega.config.load import load_config
from openr1_mega.train.grpo import GrpoRecipe
from openr1_mega.train.sft import SftRecipe

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "recipes"
WORLD = {"qwen2.5_7b": 8, "qwen2.5_72b": 32, "qwen3_30b_a3b": 8, "qwen3_235b_a22b": 64,
         "tiny": 2, "demo": 1}


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: str(p))
def test_recipe_loads(path):
    cls = SftRecipe if "sft" in path.name else GrpoRecipe
    recipe = load_config(path, cls=cls)
    world = WORLD[path.parent.name]
    if path.parent.name == "tiny" and "sft" in path.name:
        world = 1
    assert recipe.parallel.data_parallel_size(world) >= 1


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="grpo.*unknown key.*stepz"):
        load_config(RECIPES / "tiny" / "grpo_moe.yaml", ["grpo.stepz=3"], cls=GrpoRecipe)


def test_bad_value_is_named():
    with pytest.raises(ValueError, match="grpo.loss_type"):
        load_config(RECIPES / "tiny" / "grpo_moe.yaml", ["grpo.loss_type=ppo"], cls=GrpoRecipe)
    with pytest.raises(ValueError, match="rollout.group_size"):
        load_config(RECIPES / "tiny" / "grpo_moe.yaml", ["rollout.group_size=1"], cls=GrpoRecipe)
