"""Megatron logits == transformers logits, and HF -> Megatron -> HF export is bit-exact.

Every architecture, tied and untied embeddings, at TP=1; then in one 2-rank gloo world:
TP=2 for all four, EP=2 (and TP=2 with expert-TP 1) for the MoE models, PP=2 for a
dense model untied and tied (the tied output layer lives on the last stage), and TP=2 with
sequence parallelism for a MoE model (which Megatron requires to train MoE with TP > 1;
the sequence, 38 here, must split evenly across TP ranks).
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
