"""Whole-recipe checks that run when a recipe is loaded, before any process group or model.

Each dataclass checks its own fields in `__post_init__`; what needs several sections, the
world size or the model's architecture is checked here, and every error names the fields:
  - the layout fits the world: world size divisible by parallel.tp*pp*cp, and world size /
    parallel.pp divisible by parallel.ep*etp (Megatron's expert groups);
  - the layout splits the architecture (config.layout): heads and KV heads by TP, experts by
    EP, layers over the pipeline stages (uneven stages included);
  - Megatron-Core's own TransformerConfig accepts the result (the catch-all);
  - the sequences fit the model's context (arch.max_position_embeddings);
  - every reward name and reward option exists in the reward registry;
  - sft.rows_per_step splits over the data-parallel ranks;
  - rollout.tp divides the world (engines of rollout.tp ranks) and splits the model's
    attention heads; rollout.ep > 1 needs an MoE model.
The architecture is read from `model.path`'s config.json when that directory exists, else
from a config.json shipped beside the recipe (the cluster recipes carry their model's), else
the architecture checks are skipped (the model loader reports a missing model itself).
The world size is $WORLD_SIZE (torchrun sets it), or 1 for a lone process.

The model-architecture readers (transformers), the reward registry and Megatron are
imported inside the functions that need them: `import openr1_mega.config` stays light.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

from openr1_mega.config.layout import check_layout
from openr1_mega.config.schema import ArchConfig

HF_CONFIG = "config.json"


def world_size_from_env() -> int:
    """$WORLD_SIZE as torchrun sets it, else Slurm's task count when srun started the process
    (the same mapping `parallel.init` applies later); 1 without a launcher."""
    from openr1_mega.parallel.launch import slurm_env

    raw = os.environ.get("WORLD_SIZE") or slurm_env(os.environ).get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"$WORLD_SIZE={raw!r}: expected a positive integer")
    return int(raw)


def recipe_arch(recipe: Any, recipe_path: str | Path | None = None) -> ArchConfig | None:
    """The architecture a recipe trains: model.path's config.json, else one beside the recipe."""
    from openr1_mega.models.archs import arch_config

    model_dir = Path(recipe.model.path) if getattr(recipe.model, "path", "") else None
    if model_dir is not None and model_dir.is_dir():
        return arch_config(model_dir)
    if recipe_path is not None and (Path(recipe_path).parent / HF_CONFIG).is_file():
        return arch_config(Path(recipe_path).parent)
    return None


def validate_recipe(recipe: Any, world_size: int, arch: ArchConfig | None = None, *,
                    on_cuda: bool | None = None) -> None:
    """Raise ValueError naming the fields when `recipe` cannot run on `world_size` ranks.

    Args:
        recipe: a loaded recipe (GrpoRecipe, SftRecipe or Config).
        world_size: ranks the job will have.
        arch: the model's architecture; None skips the checks that need it.
        on_cuda: whether the job runs on GPUs (decides CUDA-only choices such as the
            alltoall dispatcher); None asks torch about this machine.
    """
    dp = recipe.parallel.data_parallel_size(world_size)
    if hasattr(recipe, "grpo"):
        check_rewards(recipe.grpo.rewards, recipe.grpo.reward_params)
    if hasattr(recipe, "sft") and recipe.sft.rows_per_step % dp:
        raise ValueError(f"sft.rows_per_step={recipe.sft.rows_per_step} is not a multiple of "
                         f"the data-parallel size {dp} (world size {world_size} / "
                         f"parallel.tp*pp*cp)")
    if hasattr(recipe, "rollout"):
        check_rollout(recipe.rollout, world_size, arch)
    if arch is None:
        return
    check_layout(arch, recipe.parallel)
    check_context(recipe, arch)
    check_megatron(recipe, arch, on_cuda)


def check_rewards(rewards: dict[str, float], params: dict[str, dict]) -> None:
    """Every reward name and option is registered (rl.rewards)."""
    from openr1_mega.rl.rewards import reward_names, reward_params

    unknown = sorted(set(rewards) - set(reward_names()))
    if unknown:
        raise ValueError(f"grpo.rewards: unknown reward(s) {unknown}; registered: "
                         f"{reward_names()}")
    for name, options in params.items():
        valid = reward_params(name)
        bad = sorted(set(options) - set(valid))
        if bad:
            raise ValueError(f"grpo.reward_params.{name}: unknown option(s) {bad}; "
                             f"{name} takes {sorted(valid)}")


def check_rollout(rollout: Any, world_size: int, arch: ArchConfig | None) -> None:
    """The engines fit the world and the model: rollout.tp divides the world size and the
    KV heads (or is a multiple of them, vLLM then replicates them), rollout.ep > 1 is
    only for MoE models (vLLM deals uneven expert counts itself)."""
    tp, ep = rollout.tp, rollout.ep
    if world_size % tp:
        raise ValueError(f"rollout.tp={tp} must divide the world size {world_size} (engines "
                         f"of rollout.tp ranks each)")
    if arch is None:
        return
    heads, kv_heads = arch.num_attention_heads, arch.num_kv_heads
    if heads % tp or (kv_heads % tp and tp % kv_heads):
        raise ValueError(f"rollout.tp={tp} must divide the model's {heads} attention heads "
                         f"and divide or be a multiple of its {kv_heads} KV heads")
    if ep > 1 and arch.moe is None:
        raise ValueError(f"rollout.ep={ep}: expert parallelism needs an MoE model "
                         f"({arch.arch} is dense); set rollout.ep=1")


def check_context(recipe: Any, arch: ArchConfig) -> None:
    """The longest sequence a recipe makes fits the model's context window."""
    limit = arch.max_position_embeddings
    where = f"the model's context arch.max_position_embeddings={limit}"
    if hasattr(recipe, "rollout") and hasattr(recipe, "data"):
        prompt, completion = recipe.data.max_prompt_tokens, recipe.rollout.max_tokens
        if prompt + completion > limit:
            raise ValueError(f"data.max_prompt_tokens={prompt} + rollout.max_tokens="
                             f"{completion} = {prompt + completion} exceeds {where}")
    if hasattr(recipe, "sft") and recipe.sft.seq_length > limit:
        raise ValueError(f"sft.seq_length={recipe.sft.seq_length} exceeds {where}")


def check_shared_prompt(parallel: Any, backend: str, use_te: bool) -> None:
    """grpo.shared_prompt rows need our SDPA attention (its own per-row attention layout);
    the layout is proven without pipeline stages or context parallelism only."""
    if use_te:
        raise ValueError(f"grpo.shared_prompt needs model.attention_backend=sdpa (got "
                         f"{backend}, which resolves to Transformer Engine here)")
    if parallel.pp > 1 or parallel.cp > 1:
        raise ValueError(f"grpo.shared_prompt needs parallel.pp=1 and parallel.cp=1 (got "
                         f"pp={parallel.pp}, cp={parallel.cp})")


def check_megatron(recipe: Any, arch: ArchConfig, on_cuda: bool | None) -> None:
    """Megatron-Core's TransformerConfig accepts the recipe (its rules beyond ours)."""
    import torch

    from openr1_mega.config.to_megatron import transformer_config

    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    backend = recipe.model.attention_backend
    use_te = backend == "te" or (backend == "auto" and on_cuda)
    if recipe.parallel.cp > 1 and not use_te:
        raise ValueError(f"parallel.cp={recipe.parallel.cp} needs Transformer Engine "
                         f"attention (model.attention_backend=te, got {backend})")
    if hasattr(recipe, "grpo") and recipe.grpo.shared_prompt:
        check_shared_prompt(recipe.parallel, backend, use_te)
    precision = recipe.precision
    if precision.fp8 and importlib.util.find_spec("transformer_engine") is None:
        # Megatron asks TE's version about MoE + FP8; without TE that is checked at build
        precision = dataclasses.replace(precision, fp8=None)
    try:
        transformer_config(arch, recipe.parallel, precision, recipe.model, on_cuda=on_cuda,
                           use_te=use_te)
    except (AssertionError, ValueError) as err:
        raise ValueError(f"Megatron-Core rejects the recipe's model/parallel/precision "
                         f"sections: {err}") from err
