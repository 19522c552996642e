"""Megatron logits == transformers logits, and HF -> Megatron -> HF export is bit-exact.

Every architecture, tied and untied embeddings, at TP=1; then in one 2-rank gloo world:
TP=2 for all four, EP=2 (and TP=2 with expert-TP 1) for the MoE models, PP=2 for a
dense model untied and tied (the tied output layer lives on the last stage), and TP=2 with
sequence parallelism for a MoE model (which Megatron requires to train MoE with TP > 1;
the sequence, 38 here, must split evenly across TP ranks). Uneven pipeline stages
(parallel.pp_first/last_stage_layers) on 5-layer models: PP=2 split 2+3 (a MoE model with a
dense layer) and 3+2 (a tied dense one), each saved as a dist checkpoint and reloaded at
another split (4+1, 1+4), and PP=3 split 1+2+2 on three ranks.
"""

from __future__ import annotations

import pytest

from tests._dist import run_world
from tests._mcore_helpers import (
    ARCHS,
    assert_logits_close,
    assert_same_tensors,
    batch,
    hf_logits,
    hf_tensors,
    run_megatron,
    tiny,
)

TP1_CASES = [(arch, tied) for arch in ARCHS for tied in (False, True)]
WORLD2_CASES = [
    ("qwen2", False, {"tp": 2}),
    ("qwen3", True, {"tp": 2}),
    ("qwen2_moe", False, {"tp": 2}),
    ("qwen3_moe", True, {"tp": 2}),
    ("qwen2_moe", True, {"ep": 2}),
    ("qwen3_moe", False, {"ep": 2}),
    ("qwen3_moe", False, {"tp": 2, "ep": 2, "etp": 1}),
    ("qwen2", False, {"pp": 2}),
    ("qwen3", True, {"pp": 2}),
    ("qwen2_moe", False, {"tp": 2, "sequence_parallel": True}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cases = {(a, t) for a, t in TP1_CASES} | {(a, t) for a, t, _ in WORLD2_CASES}
    return {(arch, tied): tiny(root, arch, tied) for arch, tied in sorted(cases)}


def _ids_for(layout: dict):
    return batch(seq=38) if layout.get("sequence_parallel") else batch()


def _run_cases(rank, world, cases):
    results = []
    for hf_dir, layout in cases:
        out = run_megatron(hf_dir, layout, _ids_for(layout))
        results.append({"logits": out["logits"], "export": out["export"]})
    return results


def _check(models, cases, layouts, results_by_rank):
    for i, ((arch, tied), layout) in enumerate(zip(cases, layouts, strict=True)):
        what = f"{arch} tied={tied} {layout}"
        want = hf_logits(models[arch, tied], _ids_for(layout))
        got = [r[i]["logits"] for r in results_by_rank if r[i]["logits"] is not None]
        assert got, f"{what}: no rank returned logits"
        for logits in got:  # every last-stage rank holds the TP-gathered logits
            assert_logits_close(logits, want, what)
        assert_same_tensors(results_by_rank[0][i]["export"], hf_tensors(models[arch, tied]),
                            f"{what} export")
        assert all(r[i]["export"] is None for r in results_by_rank[1:]), f"{what}: rank > 0"


def test_tp1_logits_and_export_all_archs(models):
    cases = [(models[c], {}) for c in TP1_CASES]
    results = run_world(_run_cases, cases, world_size=1)
    _check(models, TP1_CASES, [{}] * len(TP1_CASES), results)


@pytest.mark.slow
def test_tp2_ep2_pp2_logits_and_export(models):
    cases = [(models[a, t], layout) for a, t, layout in WORLD2_CASES]
    results = run_world(_run_cases, cases, world_size=2)
    _check(models, [(a, t) for a, t, _ in WORLD2_CASES], [c[2] for c in WORLD2_CASES],
           results)


# ------------------------------------------------------------ uneven pipeline stages
# 5-layer models: the split 2+3 (and 1+2+2) puts layers on stages by Megatron's offsets; the
# MoE model has a dense layer (mlp_only_layers=[1]) so a wrong offset mixes up layer kinds.
UNEVEN_MODELS = {"qwen3_moe": dict(num_hidden_layers=5, mlp_only_layers=[1]),
                 "qwen2": dict(num_hidden_layers=5, tie_word_embeddings=True)}
UNEVEN_PP2 = [  # (arch, layout, dist-checkpoint reload layout)
    ("qwen3_moe", {"pp": 2, "pp_first_stage_layers": 2}, {"pp": 2, "pp_last_stage_layers": 1}),
    ("qwen2", {"pp": 2, "pp_last_stage_layers": 2}, {"pp": 2, "pp_first_stage_layers": 1}),
]
UNEVEN_PP3 = {"pp": 3, "pp_first_stage_layers": 1, "pp_last_stage_layers": 2}


@pytest.fixture(scope="module")
def uneven_models(tmp_path_factory):
    from openr1_mega.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("uneven")
    return {arch: write_tiny_model(root / arch, arch, seed=11,
                                   **{"tie_word_embeddings": False, **extra})
            for arch, extra in UNEVEN_MODELS.items()}


def _uneven_on_rank(rank, world, cases, root):
    """Per case: logits + export at the uneven layout, then the logits after saving a dist
    checkpoint there and loading it at another uneven split."""
    from openr1_mega.checkpoint import dist as dist_ckpt

    results = []
    for i, (hf_dir, layout, reload_layout) in enumerate(cases):
        out = run_megatron(hf_dir, layout, batch())
        result = {"logits": out["logits"], "export": out["export"]}
        if reload_layout is not None:
            dist_ckpt.save(out["model"], None, {}, root / f"ckpt{i}", hf_assets=hf_dir)
            result["reloaded"] = run_megatron(hf_dir, reload_layout, batch(),
                                              source=root / f"ckpt{i}", export=False)["logits"]
        results.append(result)
    return results


def _check_uneven(hf_dir, results_by_rank, i, what):
    want = hf_logits(hf_dir, batch())
    keys = ("logits", "reloaded") if "reloaded" in results_by_rank[0][i] else ("logits",)
    for key in keys:
        got = [r[i][key] for r in results_by_rank if r[i][key] is not None]
        assert len(got) == 1, f"{what} {key}: one last-stage rank holds the logits"
        assert_logits_close(got[0], want, f"{what} {key}")
    assert_same_tensors(results_by_rank[0][i]["export"], hf_tensors(hf_dir), f"{what} export")


@pytest.mark.slow
def test_uneven_pp2_logits_export_and_dist_checkpoint(uneven_models, tmp_path):
    cases = [(uneven_models[arch], layout, reload) for arch, layout, reload in UNEVEN_PP2]
    results = run_world(_uneven_on_rank, cases, tmp_path, world_size=2)
    for i, (arch, layout, _) in enumerate(UNEVEN_PP2):
        _check_uneven(uneven_models[arch], results, i, f"{arch} {layout}")


@pytest.mark.slow
def test_uneven_pp3_logits_and_export(uneven_models, tmp_path):
    cases = [(uneven_models["qwen2"], UNEVEN_PP3, None)]
    results = run_world(_uneven_on_rank, cases, tmp_path, world_size=3)
    _check_uneven(uneven_models["qwen2"], results, 0, f"qwen2 {UNEVEN_PP3}")
