"""CpuAdamW uses Megatron-Core's parameter groups: no weight decay on biases and 1-D parameters
(norms), expert-parallel parameters apart, so a recipe trains the same way on CPU and GPU.

References: Megatron-Core 0.16.1's own `optimizer._get_param_groups` (what its GPU optimizer
builds; private, so pinned to this version here) and, independently, the rule written out by
name and shape (bias or 1-D -> no decay). The step test checks the effect: with all gradients
zero, an AdamW step changes a parameter only through weight decay, so norm weights and biases
stay bit-identical while a matrix shrinks by exactly (1 - lr x weight_decay).
"""

from __future__ import annotations

import pytest

from tests import _mcore_helpers as helpers
from tests._dist import run_world

LR, WD = 0.1, 0.5


def _build(root, arch, ep=1):
    from openr1_mega.checkpoint.hf import load_hf_weights
    from openr1_mega.config import ParallelConfig, PrecisionConfig
    from openr1_mega.config.train import OptimConfig
    from openr1_mega.models.build import build_model
    from openr1_mega.parallel.init import initialize
    from openr1_mega.train.step import CpuAdamW, wrap_ddp

    parallel = ParallelConfig(ep=ep)
    initialize(parallel)
    hf_dir = helpers.tiny(root, arch, False)
    gpt = build_model(hf_dir, parallel, precision=PrecisionConfig(dtype="fp32"))
    load_hf_weights(gpt, hf_dir)
    model = wrap_ddp(gpt)
    return model, CpuAdamW(model, OptimConfig(lr=LR, weight_decay=WD, clip_grad=0.0))


def _groups_worker(rank, world_size, root, arch):
    """Per parameter name: (ours, Megatron's, independent rule), each (wd_mult, expert, wd)."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    model, optimizer = _build(root, arch, ep=world_size)
    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters())

    def by_name(groups, weight_decay):
        return {names[id(p)]: (g["wd_mult"], g["is_expert_parallel"], weight_decay(g))
                for g in groups for p in g["params"]}

    ours = by_name(optimizer.param_groups, lambda g: g["weight_decay"])
    megatron = by_name(_get_param_groups([model], OptimizerConfig(weight_decay=WD), None),
                       lambda g: WD * g["wd_mult"])
    rule = {n: (0.0 if n.endswith(".bias") or p.dim() == 1 else 1.0,
                not getattr(p, "allreduce", True),
                0.0 if n.endswith(".bias") or p.dim() == 1 else WD) for n, p in params.items()}
    return ours, megatron, rule, len(optimizer.param_groups)


def _check_groups(result, arch: str) -> None:
    ours, megatron, rule, n_groups = result
    assert n_groups == 4, "every rank must hold the same four groups"
    assert ours == megatron, {n: (ours.get(n), megatron.get(n))
                              for n in set(ours) | set(megatron) if ours.get(n) != megatron.get(n)}
    assert ours == rule
    no_decay = [n for n, (mult, _, _) in ours.items() if mult == 0.0]
    assert any(n.endswith(".bias") for n in no_decay) or arch == "qwen3_moe"
    assert any("layernorm" in n or "norm" in n for n in no_decay)
    assert any(mult == 1.0 for mult, _, _ in ours.values())
    if arch == "qwen3_moe":
        assert any(expert for _, expert, _ in ours.values()), "MoE: expert-parallel group empty"


def test_groups_follow_megatron_dense(tmp_path):
    helpers.tiny(tmp_path, "qwen2", False)
    (result,) = run_world(_groups_worker, tmp_path, "qwen2", world_size=1)
    _check_groups(result, "qwen2")


@pytest.mark.slow
def test_groups_follow_megatron_moe_expert_parallel(tmp_path):
    """EP=2: Megatron marks expert weights allreduce=False only under expert parallelism."""
    helpers.tiny(tmp_path, "qwen3_moe", False)
    for result in run_world(_groups_worker, tmp_path, "qwen3_moe", world_size=2):
        _check_groups(result, "qwen3_moe")


def _zero_grad_step_worker(rank, world_size, root):
    import torch

    model, optimizer = _build(root, "qwen2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad_buffer()  # every main_grad is 0: only weight decay can move a parameter
    optimizer.step()
    out = {}
    for name, p in model.named_parameters():
        decays = not (name.endswith(".bias") or p.dim() == 1)
        want = before[name] * (1 - LR * WD) if decays else before[name]
        out[name] = (decays, bool(torch.equal(p, before[name])),
                     float((p - want).abs().max()))
    return out


def test_zero_grad_step_decays_matrices_only(tmp_path):
    helpers.tiny(tmp_path, "qwen2", False)
    (result,) = run_world(_zero_grad_step_worker, tmp_path, world_size=1)
    norms = [n for n in result if "norm" in n and not result[n][0]]
    assert norms, "the model must have norm weights"
    for name, (decays, unchanged, err) in result.items():
        if decays:
            assert not unchanged and err < 1e-6, f"{name}: not decayed by lr x wd (err {err})"
        else:
            assert unchanged, f"{name}: a bias / norm weight moved with zero gradient"
