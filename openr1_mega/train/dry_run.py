"""Dry run: validate a recipe for a world size and print the plan, building nothing large.

    python -m openr1_mega.train.grpo --recipe R.yaml --dry-run [--world-size N] [key=value ...]
    python -m openr1_mega.train.sft  --recipe R.yaml --dry-run [--world-size N]

No process group, no model, no data: the recipe is loaded and validated as a real run
would load it (config.validate), the architecture comes from model.path's config.json or
the one shipped beside the recipe, and the parameters each rank would hold are counted
from the architecture alone, by Megatron's layout rules (local spec; TE's fused norms hold
the same numbers):
  first stage    embedding            Vp/TP x H          (Vp: vocab padded to 128*TP)
  last stage     final norm           H
                 output layer         Vp/TP x H          (absent when tied and PP=1)
  every layer    norms                2H (+ 2 head_dim with q/k norms)
                 attention            (nh + 2 ng) d H / TP (+ (nh + 2 ng) d / TP bias)
                                      + H nh d / TP
                 dense MLP            3 F H / TP
                 MoE router           E x H
                 routed experts       E/EP x 3 Fe H / ETP    ("expert" params)
                 shared expert        3 Fs H / TP + H        (Qwen2-MoE)
tests/test_recipes.py checks these counts against a real Megatron model on each rank.
World size: --world-size, else $WORLD_SIZE, else the smallest world the layout and
rollout.tp fit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openr1_mega.config.layout import stage_layers, stage_offsets
from openr1_mega.config.load import load_config
from openr1_mega.config.schema import ArchConfig, ParallelConfig
from openr1_mega.config.validate import recipe_arch, world_size_from_env

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class StageParams:
    """Parameters one rank of a pipeline stage holds (its TP / EP share)."""

    stage: int
    first_layer: int
    layers: int
    dense: int
    """Everything but the routed experts (embedding, attention, norms, dense MLP, router)."""
    expert: int
    """Routed-expert parameters (sharded over EP x expert-TP)."""

    @property
    def total(self) -> int:
        return self.dense + self.expert


def layer_params(arch: ArchConfig, parallel: ParallelConfig, layer: int) -> tuple[int, int]:
    """(dense, expert) parameters of global layer `layer` on one rank."""
    h, d, tp = arch.hidden_size, arch.head_dim, parallel.tp
    nh, ng = arch.num_attention_heads, arch.num_kv_heads
    qkv_rows = (nh + 2 * ng) * d // tp
    dense = 2 * h + qkv_rows * h + h * nh * d // tp
    dense += qkv_rows if arch.qkv_bias else 0
    dense += 2 * d if arch.qk_norm else 0
    if not arch.is_moe_layer(layer):
        return dense + 3 * arch.ffn_hidden_size * h // tp, 0
    moe = arch.moe
    dense += moe.num_experts * h
    if moe.shared_expert_ffn_hidden_size:
        dense += 3 * moe.shared_expert_ffn_hidden_size * h // tp
        dense += h if moe.shared_expert_gate else 0
    expert = moe.num_experts // parallel.ep * 3 * moe.ffn_hidden_size * h // parallel.expert_tp
    return dense, expert


def stage_params(arch: ArchConfig, parallel: ParallelConfig) -> list[StageParams]:
    """Per pipeline stage: the parameters of one of its ranks."""
    vocab_rows = arch.padded_vocab_size(parallel.tp) // parallel.tp * arch.hidden_size
    counts, offsets = (stage_layers(arch.num_layers, parallel),
                       stage_offsets(arch.num_layers, parallel))
    out = []
    for stage, (first, n) in enumerate(zip(offsets, counts, strict=True)):
        per_layer = [layer_params(arch, parallel, i) for i in range(first, first + n)]
        dense, expert = sum(p[0] for p in per_layer), sum(p[1] for p in per_layer)
        is_first, is_last = stage == 0, stage == parallel.pp - 1
        dense += vocab_rows if is_first else 0
        if is_last:
            dense += arch.hidden_size
            dense += 0 if arch.tie_word_embeddings and is_first else vocab_rows
        out.append(StageParams(stage, first, n, dense, expert))
    return out


def model_totals(arch: ArchConfig) -> tuple[int, int]:
    """(all parameters, parameters active per token) of the whole model (vocab padded)."""
    whole = stage_params(arch, ParallelConfig())[0]
    if arch.moe is None:
        return whole.total, whole.total
    return whole.total, whole.dense + whole.expert * arch.moe.topk // arch.moe.num_experts


def smallest_world(parallel: ParallelConfig) -> int:
    """The fewest ranks the layout fits: TP*PP*CP times the DP that the expert groups need."""
    experts = parallel.ep * parallel.expert_tp
    dp = experts // math.gcd(parallel.cp * parallel.tp, experts)
    return parallel.model_parallel_size() * dp


def main(recipe_path: str | Path, overrides: list[str], cls: type,
         world_size: int | None = None) -> dict:
    """Validate the recipe for the world, print the plan, return it (see the module doc)."""
    plan = make_plan(recipe_path, overrides, cls, world_size)
    print(format_plan(plan))
    return plan


def make_plan(recipe_path: str | Path, overrides: list[str], cls: type,
              world_size: int | None = None) -> dict:
    """The plan as a dict: layout, per-stage parameters, and the loop's settings."""
    unvalidated = _read(recipe_path, overrides, cls)
    world, world_from = _world_size(unvalidated, world_size)
    on_cuda = targets_gpu(unvalidated)
    recipe = load_config(recipe_path, overrides, cls, world_size=world, on_cuda=on_cuda)
    arch = recipe_arch(recipe, recipe_path)
    if arch is None:
        raise ValueError(f"{recipe_path}: model.path={recipe.model.path!r} is not a directory "
                         "and no config.json lies beside the recipe: the dry run needs the "
                         "architecture")
    par, bytes_per = recipe.parallel, DTYPE_BYTES[recipe.precision.dtype]
    total, active = model_totals(arch)
    return {
        "recipe": str(recipe_path), "world_size": world, "world_size_from": world_from,
        "target": _target(unvalidated, on_cuda),
        "model": _model_summary(recipe, arch, total, active),
        "layout": _layout_summary(par, world, arch),
        "params_per_rank": [dict(stage=s.stage, layers=[s.first_layer, s.first_layer + s.layers
                                                        - 1], dense=s.dense, expert=s.expert,
                                 total=s.total, bytes=s.total * bytes_per,
                                 dtype=recipe.precision.dtype)
                            for s in stage_params(arch, par)],
        "run": _run_summary(recipe, par.data_parallel_size(world)),
    }


def targets_gpu(recipe: Any) -> bool:
    """Whether the recipe runs on GPUs: this machine has one, or it asks for TE, alltoall
    or FP8 (the cluster recipes), so a laptop checks them as their cluster will."""
    import torch

    model = recipe.model
    return (torch.cuda.is_available() or model.attention_backend == "te"
            or model.moe_token_dispatcher == "alltoall" or recipe.precision.fp8 is not None)


def _target(recipe: Any, on_cuda: bool) -> str:
    import torch

    if torch.cuda.is_available():
        return "GPU (this machine)"
    if on_cuda:
        return "GPU (the recipe asks for TE, alltoall or FP8)"
    return "CPU (this machine; the recipe asks for nothing GPU-only)"


def format_plan(plan: dict) -> str:
    """The plan as the text the dry run prints."""
    m, lay, run = plan["model"], plan["layout"], plan["run"]
    lines = [f"dry run: {plan['recipe']} on {plan['world_size']} ranks "
             f"({plan['world_size_from']}), target {plan['target']}",
             "model:  " + ", ".join(f"{k}={v}" for k, v in m.items()),
             "layout: " + ", ".join(f"{k}={v}" for k, v in lay.items()),
             "parameters per rank (one TP/EP shard of each pipeline stage):"]
    for s in plan["params_per_rank"]:
        lines.append(f"  stage {s['stage']}: layers {s['layers'][0]}-{s['layers'][1]}  "
                     f"dense {s['dense']:,}  expert {s['expert']:,}  total {s['total']:,}  "
                     f"= {s['bytes'] / 2**30:.2f} GiB {s['dtype']}")
    lines.append("run:    " + ", ".join(f"{k}={v}" for k, v in run.items()))
    return "\n".join(lines)


def _model_summary(recipe: Any, arch: ArchConfig, total: int, active: int) -> dict:
    out = {"path": recipe.model.path, "arch": arch.arch, "layers": arch.num_layers,
           "hidden": arch.hidden_size, "heads": arch.num_attention_heads,
           "kv_heads": arch.num_kv_heads, "vocab": arch.vocab_size,
           "context": arch.max_position_embeddings, "params_total": f"{total:,}"}
    if arch.moe:
        out.update(experts=arch.moe.num_experts, topk=arch.moe.topk,
                   params_active_per_token=f"{active:,}")
    return out


def _layout_summary(par: ParallelConfig, world: int, arch: ArchConfig) -> dict:
    out = {"tp": par.tp, "pp": par.pp, "ep": par.ep, "etp": par.expert_tp, "cp": par.cp,
           "dp": par.data_parallel_size(world), "sequence_parallel": par.sequence_parallel,
           "stage_layers": stage_layers(arch.num_layers, par)}
    if arch.moe:
        out["expert_dp"] = world // (par.pp * par.ep * par.expert_tp)
    return out


def _run_summary(recipe: Any, dp: int) -> dict:
    if hasattr(recipe, "grpo"):
        g, r, d = recipe.grpo, recipe.rollout, recipe.data
        completions = g.prompts_per_step * r.group_size
        return {"steps": g.steps, "prompts_per_step": g.prompts_per_step,
                "group_size": r.group_size, "completions_per_step": completions,
                "completions_per_dp_rank": completions / dp,
                "micro_batch_tokens": g.micro_batch_tokens,
                "max_sequence": d.max_prompt_tokens + r.max_tokens,
                "loss_type": g.loss_type, "beta": g.beta, "num_iterations": g.num_iterations,
                "temperature": f"{r.temperature} (sampler and trainer log-probs)",
                "rollout_tp": r.tp, "rollout_ep": r.ep,
                "top_p": r.top_p, "max_tokens": r.max_tokens, "rewards": g.rewards}
    s = recipe.sft
    return {"seq_length": s.seq_length, "pack": s.pack, "rows_per_step": s.rows_per_step,
            "rows_per_dp_rank": s.rows_per_step // dp, "epochs": s.epochs,
            "steps": "ceil(epochs x train rows / rows_per_step), rows known once data loads",
            "tokens_per_step_max": s.rows_per_step * s.seq_length}


def _world_size(recipe: Any, world_size: int | None) -> tuple[int, str]:
    if world_size is not None:
        return world_size, "--world-size"
    if "WORLD_SIZE" in os.environ:
        return world_size_from_env(), "$WORLD_SIZE"
    rollout_tp = recipe.rollout.tp if hasattr(recipe, "rollout") else 1
    return math.lcm(smallest_world(recipe.parallel), rollout_tp), \
        "smallest world the layout and rollout.tp fit"


def _read(recipe_path, overrides, cls):
    """The recipe's dataclasses before the whole-recipe validation (for its layout)."""
    import yaml

    from openr1_mega.config.load import apply_overrides, from_dict

    data = yaml.safe_load(Path(recipe_path).read_text()) or {}
    return from_dict(cls, apply_overrides(data, overrides))
