"""Engine groups (rollout.tp ranks per vLLM engine) and weight sync into sharded engines.

Cheapest first:
- EngineGroups on a real gloo world of 4: engines {0,1} and {2,3}, prompts dealt whole;
  the rollout config and recipe checks name the fields.
- The kernel-format expert route's pure functions against references: the engine ranks'
  intermediate slices sum to the full expert MLP (row-parallel reduction), the local
  expert slots are exactly vLLM's own expert map (`determine_expert_map`).
- Parity (slow): trainer (Megatron, TP=2 / TP=1 / EP=2) -> sync -> vLLM engine (TP=2 /
  TP=1) prompt log-probs equal transformers fp32 on the same perturbed weights within
  1e-4, dense and MoE, after the engine has slept and woken in the loop's order.
The trainer receives its new weights by loading a perturbed checkpoint (every tensor moved
by seeded noise), so the reference is transformers on that checkpoint; the engine starts
from the unperturbed one and only the sync can move it there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openr1_mega.rl.engine_groups import EngineGroups
from openr1_mega.rl.rollout import VLLM_CPU_NO_EP
from openr1_mega.rl.weight_sync import expert_shard, local_expert_slots, stack_experts
from tests._dist import run_world
from tests._vllm_helpers import SEQUENCES, hf_logprobs, perturbed_copy

TOL = 1e-4


# --------------------------------------------------------------------------- groups
def _groups(rank, world, size, num_prompts):
    groups = EngineGroups.split(size)
    return (groups.index, groups.rank, groups.count, groups.members(),
            groups.prompt_indices(num_prompts))


def test_world_of_four_makes_two_engines_of_two():
    ranks = run_world(_groups, 2, 10, world_size=4)
    assert [r[:3] for r in ranks] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    assert [r[3] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert ranks[0][4] == ranks[1][4] == [0, 2, 4, 6, 8]  # one engine, the same requests
    assert ranks[2][4] == ranks[3][4] == [1, 3, 5, 7, 9]
    assert sorted(ranks[0][4] + ranks[2][4]) == list(range(10))  # every prompt once


def test_vllm_lays_out_the_world_as_our_engines():
    """vLLM's external launcher reshapes the torchrun world as (-1, DP, PP, PCP, TP) with
    DP = PP = PCP = 1 (vllm.distributed.parallel_state.initialize_model_parallel): its TP
    groups, and its EP groups for MoE (TP ranks transposed with DP), are our engines."""
    world, tp = 4, 2
    all_ranks = torch.arange(world).reshape(-1, 1, 1, 1, tp)
    tp_groups = [g.tolist() for g in all_ranks.view(-1, tp).unbind(0)]
    ep_groups = [g.tolist() for g in all_ranks.transpose(1, 2).reshape(-1, tp).unbind(0)]
    ours = [list(range(k * tp, (k + 1) * tp)) for k in range(world // tp)]
    assert tp_groups == ep_groups == ours


def test_bad_tp_names_the_field():
    with pytest.raises(ValueError, match=r"rollout.tp=2 must divide the world size 1"):
        EngineGroups.split(2)  # a lone process: world 1
    with pytest.raises(ValueError, match=r"rollout.tp=0"):
        EngineGroups.split(0)


def test_rollout_config_checks_name_the_fields():
    from openr1_mega.config.train import RolloutConfig

    with pytest.raises(ValueError, match=r"rollout.tp=0: must be >= 1"):
        RolloutConfig(tp=0)
    with pytest.raises(ValueError, match=r"rollout.ep=2: must be 1 or equal to rollout.tp=4 "
                                         r"\(vLLM's expert parallelism spans the engine's "
                                         r"tensor-parallel ranks\)"):
        RolloutConfig(tp=4, ep=2)
    assert RolloutConfig(tp=2, ep=2).ep == 2


def test_recipe_checks_rollout_against_world_and_model(tmp_path):
    from openr1_mega.config.train import RolloutConfig
    from openr1_mega.config.validate import check_rollout
    from openr1_mega.models.archs import arch_config
    from openr1_mega.models.tiny import write_tiny_model

    dense = arch_config(write_tiny_model(tmp_path / "d", "qwen2"))
    moe = arch_config(write_tiny_model(tmp_path / "m", "qwen3_moe"))
    with pytest.raises(ValueError, match=r"rollout.tp=2 must divide the world size 3"):
        check_rollout(RolloutConfig(tp=2), 3, None)
    with pytest.raises(ValueError, match=r"rollout.ep=2: expert parallelism needs an MoE"):
        check_rollout(RolloutConfig(tp=2, ep=2), 2, dense)
    with pytest.raises(ValueError, match=r"rollout.tp=8 must divide the model's 4 attention"):
        check_rollout(RolloutConfig(tp=8), 8, dense)
    check_rollout(RolloutConfig(tp=2, ep=2), 4, moe)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the vllm-cpu arguments")
def test_engine_args_on_cpu():
    """vllm-cpu: eager whatever enforce_eager says, KV cache in bytes, the parallel sizes
    passed through; TP without the external launcher is refused, and so is expert
    parallelism, which vllm-cpu cannot run (VLLM_CPU_NO_EP says why)."""
    from openr1_mega.rl.rollout import EngineConfig, _engine_args

    args = _engine_args(EngineConfig(enforce_eager=False, external_launcher=True,
                                     tensor_parallel_size=2, max_model_len=512,
                                     kv_cache_bytes=1 << 20))
    assert args["enforce_eager"] and args["kv_cache_memory_bytes"] == 1 << 20
    assert (args["tensor_parallel_size"], args["enable_expert_parallel"],
            args["max_model_len"]) == (2, False, 512)
    assert args["distributed_executor_backend"] == "external_launcher"
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs external_launcher"):
        _engine_args(EngineConfig(tensor_parallel_size=2))
    with pytest.raises(ValueError, match=r"rollout.ep > 1 .* does not run on vllm-cpu"):
        _engine_args(EngineConfig(external_launcher=True, tensor_parallel_size=2,
                                  enable_expert_parallel=True))


# ------------------------------------------------------------- kernel-format experts
def _expert_mlp(x, gate, up, down):
    return torch.nn.functional.silu(x @ gate.T) * (x @ up.T) @ down.T


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_expert_shards_sum_to_the_full_expert(tp):
    """Column-parallel gate/up and row-parallel down: the ranks' partial outputs sum to the
    full expert's output, and the slices tile the weights (float64 reference)."""
    gen = torch.Generator().manual_seed(tp)
    hidden, inter = 8, 12
    gate, up = torch.randn(inter, hidden, generator=gen), torch.randn(inter, hidden, generator=gen)
    down, x = torch.randn(hidden, inter, generator=gen), torch.randn(3, hidden, generator=gen)
    parts = [[expert_shard(w, p, r, tp) for w, p in ((gate, "gate"), (up, "up"),
                                                     (down, "down"))] for r in range(tp)]
    total = sum(_expert_mlp(x.double(), *(w.double() for w in part)) for part in parts)
    torch.testing.assert_close(total, _expert_mlp(x.double(), gate.double(), up.double(),
                                                  down.double()))
    assert torch.equal(torch.cat([p[0] for p in parts]), gate)
    assert torch.equal(torch.cat([p[2] for p in parts], dim=1), down)


def test_expert_shard_rejects_an_uneven_split():
    with pytest.raises(ValueError, match=r"intermediate size 10 is not divisible by the "
                                         r"engine's tensor-parallel size 4"):
        expert_shard(torch.zeros(10, 4), "gate", 0, 4)


@pytest.mark.parametrize("num_experts, ep", [(8, 2), (7, 2), (6, 4)])
def test_local_expert_slots_follow_vllms_expert_map(num_experts, ep):
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    seen = []
    for rank in range(ep):
        local, expert_map, _ = determine_expert_map(ep, rank, num_experts)
        slots = local_expert_slots(expert_map, num_experts)
        assert sorted(slots.values()) == list(range(local))
        assert all(expert_map[e] == s for e, s in slots.items())
        seen += list(slots)
    assert sorted(seen) == list(range(num_experts))  # every expert on exactly one rank
    assert local_expert_slots(None, 3) == {0: 0, 1: 1, 2: 2}


def test_stack_experts_is_vllms_padded_layout():
    """w13 = [gate | up] per expert in slot order, each half zero-padded to P rows; w2 the
    down projection zero-padded to P columns (cpu_moe.py _pad_moe_intermediate)."""
    gen = torch.Generator().manual_seed(0)
    hidden, inter, padded = 4, 3, 8
    slots = {5: 1, 2: 0}  # global expert -> slot: slot order is 2 then 5
    tensors = {(e, p): torch.randn(*((hidden, inter) if p == "down" else (inter, hidden)),
                                   generator=gen)
               for e in slots for p in ("gate", "up", "down")}
    tensors[0, "gate"] = None  # a remote expert arrives and is dropped
    w13, w2 = stack_experts(tensors, slots, padded)
    assert w13.shape == (2, 2 * padded, hidden) and w2.shape == (2, hidden, padded)
    for expert, slot in slots.items():
        assert torch.equal(w13[slot, :inter], tensors[expert, "gate"])
        assert torch.equal(w13[slot, padded:padded + inter], tensors[expert, "up"])
        assert torch.equal(w2[slot, :, :inter], tensors[expert, "down"])
    assert not w13[:, inter:padded].any() and not w13[:, padded + inter:].any()
    assert not w2[:, :, inter:].any()


# ------------------------------------------------------------------------- parity
class _Spy:
    """Appends "sync" / "generate" to an engine's transitions when its vLLM instance
    reloads weights or generates, then calls the real method."""

    def __init__(self, engine):
        llm, log = engine.llm, engine.transitions
        rpc, generate = llm.collective_rpc, llm.generate

        def collective_rpc(method, *args, **kwargs):
            if method == "reload_weights" and log[-1:] != ["sync"]:
                log.append("sync")
            return rpc(method, *args, **kwargs)

        def spy_generate(*args, **kwargs):
            log.append("generate")
            return generate(*args, **kwargs)

        llm.collective_rpc, llm.generate = collective_rpc, spy_generate


def _sync_and_score(rank, world, cases, trainer_layout, engine_tp, engine_ep):
    """Per case (base dir, perturbed dir): start an engine of `engine_tp` ranks from base,
    load the perturbed weights into a Megatron trainer of `trainer_layout`, run the loop's
    choreography (release -> sync_engine -> generate) and return the engine's prompt
    log-probs before and after, with the recorded transitions."""
    from types import SimpleNamespace

    from openr1_mega.rl.rollout import EngineConfig, RolloutEngine
    from openr1_mega.train import policy as policy_lib
    from tests.test_sync_source import _load

    out = []
    for base, perturbed in cases:
        groups = EngineGroups.split(engine_tp)
        engine = RolloutEngine(base, EngineConfig(dtype="float32", external_launcher=True,
                                                  tensor_parallel_size=engine_tp,
                                                  enable_expert_parallel=engine_ep))
        shards = {n: tuple(p.shape) for n, p in engine.model().named_parameters()}
        before = engine.prompt_logprobs(SEQUENCES)
        model = _load(perturbed, trainer_layout)
        _Spy(engine)
        policy_lib.release_engine(engine)
        released = set(engine.released)
        policy_lib.sync_engine(SimpleNamespace(model=model), engine)
        after = engine.prompt_logprobs(SEQUENCES)
        out.append({"before": [t.numpy() for t in before], "after": [t.numpy() for t in after],
                    "transitions": list(engine.transitions), "shards": shards,
                    "released": (released, set(engine.released)),
                    "members": groups.members()})
    return out


def _check_world(tmp_path, archs, trainer_layout, engine_tp, engine_ep=False, world=2):
    from tests._mcore_helpers import tiny

    cases = [(tiny(tmp_path, arch, tied), tmp_path / f"{arch}_{tied}_new") for arch, tied in archs]
    for base, perturbed in cases:
        perturbed_copy(base, perturbed)
    ranks = run_world(_sync_and_score, cases, trainer_layout, engine_tp, engine_ep,
                      world_size=world)
    for i, (base, perturbed) in enumerate(cases):
        want, start = hf_logprobs(perturbed), hf_logprobs(base)
        for rank, got in enumerate(r[i] for r in ranks):
            what = f"{base.name} trainer {trainer_layout} -> engine tp={engine_tp}, rank {rank}"
            before = max((torch.from_numpy(b) - s).abs().max().item()
                         for b, s in zip(got["before"], start))
            moved = max((torch.from_numpy(b) - w).abs().max().item()
                        for b, w in zip(got["before"], want))
            diff = max((torch.from_numpy(a) - w).abs().max().item()
                       for a, w in zip(got["after"], want))
            assert before < TOL and moved > 1e-2, what  # the engine starts from base
            assert diff < TOL, f"{what}: max |vLLM - transformers| {diff:.3g} >= {TOL}"
            assert got["transitions"] == ["sleep", "wake_weights", "sync", "wake_kv_cache",
                                          "generate"], what
            assert got["released"] == ({"weights", "kv_cache"}, set()), what
            assert got["members"] == list(range(rank // engine_tp * engine_tp,
                                                (rank // engine_tp + 1) * engine_tp))
        vocab = load_file(next(base.glob("*.safetensors")))["model.embed_tokens.weight"].shape[0]
        embed = next(s for n, s in ranks[0][i]["shards"].items() if "embed_tokens" in n)
        assert (embed[0] < vocab) == (engine_tp > 1)  # each engine rank holds its own shard


DENSE_AND_MOE = [("qwen3_moe", False), ("qwen3", False)]
"""MoE first: vLLM creates its expert-parallel group with the first engine of a process,
only for an MoE model, so an MoE engine after a dense one fails ("expert parallel group
is not initialized")."""


@pytest.mark.slow
def test_trainer_tp2_to_engine_tp2(tmp_path):
    _check_world(tmp_path, DENSE_AND_MOE, {"tp": 2}, engine_tp=2)


@pytest.mark.slow
def test_trainer_tp2_to_engine_tp1(tmp_path):
    _check_world(tmp_path, DENSE_AND_MOE, {"tp": 2}, engine_tp=1)


@pytest.mark.slow
def test_trainer_tp1_to_engine_tp2(tmp_path):
    """World 2, trainer TP=1 (data-parallel replicas) -> one engine over both ranks."""
    _check_world(tmp_path, DENSE_AND_MOE, {"tp": 1}, engine_tp=2)


@pytest.mark.slow
def test_moe_trainer_ep2_to_engine_tp2(tmp_path):
    """Experts sharded by the trainer's EP, every engine rank holding a TP slice of all of
    them (Qwen2-MoE: shared expert, tied embeddings)."""
    _check_world(tmp_path, [("qwen2_moe", True)], {"ep": 2}, engine_tp=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=VLLM_CPU_NO_EP)
def test_moe_trainer_ep2_to_engine_ep2(tmp_path):
    """Engine expert parallelism (each rank whole experts): GPU only, see the skip reason."""
    _check_world(tmp_path, [("qwen3_moe", False)], {"ep": 2}, engine_tp=2, engine_ep=True)


def test_dry_run_fits_the_world_to_rollout_tp(monkeypatch):
    from openr1_mega.train import dry_run
    from openr1_mega.train.grpo import GrpoRecipe

    recipe = Path(__file__).parent.parent / "examples/recipes/qwen3_30b_a3b/grpo.yaml"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plan = dry_run.make_plan(recipe, ["rollout.tp=16", "rollout.ep=1"], GrpoRecipe)
    assert plan["world_size"] == 16 and plan["run"]["rollout_tp"] == 16  # lcm(8, 16)
    with pytest.raises(ValueError, match=r"rollout.tp=16 must divide the world size 8"):
        dry_run.make_plan(recipe, ["rollout.tp=16", "rollout.ep=1"], GrpoRecipe, 8)


@pytest.mark.slow
def test_world_of_four_runs_two_tp2_engines(tmp_path):
    """Trainer TP=2 x DP=2 -> engines {0,1} and {2,3}: vLLM's own TP groups are our engines
    (RolloutEngine checks them at start), and both engines load their shards."""
    _check_world(tmp_path, [("qwen3", False)], {"tp": 2}, engine_tp=2, world=4)
