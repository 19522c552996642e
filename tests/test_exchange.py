"""rl/exchange.py on real gloo worlds against the single-process path.

Reference (one process, the whole batch, as the loop did before the exchange):
compute_rewards over all completions, ops.grpo_advantage_stats over all totals, and
micro_batches(all completions) for each data-parallel rank. Each rank of a world of 2 or 4
holds only its engine's completions (engines of 1, 2 or 4 ranks), scores its share with a
real RewardSet (accuracy via math-verify, format, the group-relative length reward), and
receives its DP rank's completions for trainer layouts mixing TP and DP. Micro-batches,
totals, advantages, the zero-std count and counters must be equal exactly; reward means
and stds too (the table carries every value, summed in the reference's order), except
`<reward>/seconds` (wall time: the slowest rank's, only checked to be present). Object
collectives are made to raise inside the workers.
"""

import math

import pytest
import torch
import torch.distributed as dist

from openr1_mega import ops
from openr1_mega.rl.engine_groups import EngineGroups
from openr1_mega.rl.exchange import deliver, reward_inputs, score
from openr1_mega.rl.experience import (
    build_micro_batches,
    micro_batches,
    plan_micro_batches,
)
from openr1_mega.rl.rewards import RewardSet
from openr1_mega.rl.types import Completion
from tests._dist import run_world

GROUP_SIZE, PROMPTS, BUDGET, PAD = 4, 6, 48, 0
SPEC = {"accuracy": 1.0, "format": 0.25, "length": 0.5}
PARAMS = {"accuracy": {"workers": 0}, "length": {"workers": 0}}
FIELDS = ("input_ids", "position_ids", "targets", "mask", "sampler_logprobs", "advantages",
          "index")


def _prompts() -> list[dict]:
    return [{"prompt": f"What is {p} + {p}?", "answer": str(2 * p),
             "prompt_ids": [1 + p] * (3 + p % 3)} for p in range(PROMPTS)]


def _completion(p: int, j: int) -> Completion:
    """Sample j of prompt p: right or wrong, well-formed or not, of varied length; prompt 1's
    samples all score the same (a zero-std group); some have no sampler log-probs."""
    right = (p + j) % 2 == 0 or p == 1
    answer = 2 * p if right else 2 * p + 1
    text = (f"<think>{'so ' * (j + p % 2) * (p != 1)}</think>"
            f"<answer>\\boxed{{{answer}}}</answer>" if j != 3 or p == 1 else f"{answer}")
    n = 5 if p == 1 else 2 + (5 * p + 3 * j) % 11
    ids = [10 + (p * 7 + j * 3 + k) % 50 for k in range(n)]
    logprobs = [] if (p, j) == (4, 2) else [-0.01 * (k + 1) - 0.1 * j for k in range(n)]
    return Completion(p, _prompts()[p]["prompt_ids"], ids, text,
                      "length" if n == 12 else "stop", logprobs)


def _batch() -> list[Completion]:
    return [_completion(p, j) for p in range(PROMPTS) for j in range(GROUP_SIZE)]


def _rewards() -> RewardSet:
    return RewardSet.from_spec(SPEC, params=PARAMS, timeout=None)


def _forbid_object_collectives() -> None:
    """Inside a worker: any object collective raises (the exchange must use tensors)."""
    def refuse(*_a, **_k):
        raise AssertionError("an object collective ran")

    for name in ("all_gather_object", "broadcast_object_list", "gather_object",
                 "scatter_object_list"):
        setattr(dist, name, refuse)


def _plan_kwargs(case: dict) -> dict:
    return {"width_multiple": case["multiple"], "uniform": case["uniform"]}


def _exchange_worker(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """Every case on this rank: its engine's completions scored, its DP share delivered."""
    _forbid_object_collectives()
    prompts, rewards, out = _prompts(), _rewards(), []
    for case in cases:
        engines = EngineGroups.split(case["engine"])
        mine = set(engines.prompt_indices(PROMPTS))
        completions = [c for c in _batch() if c.prompt_index in mine]
        scored = score(completions, prompts, engines, rewards, GROUP_SIZE)
        dp_rank, dp_size = case["dp_of"][rank], max(case["dp_of"]) + 1
        plan = plan_micro_batches(scored.table.lengths(), BUDGET, dp_size, **_plan_kwargs(case))
        rows = deliver(scored, plan, dp_rank, engines, prompts)
        batches = build_micro_batches(plan, rows, scored.stats.advantages, PAD, True, dp_rank)
        out.append({"totals": scored.table.totals(), "advantages": scored.stats.advantages,
                    "zero_std": int(scored.stats.num_zero_std_groups),
                    "metrics": scored.metrics, "received": sorted(rows),
                    "moved": len(set(rows) - set(scored.held)),
                    "batches": [{f: getattr(b, f) for f in FIELDS} for b in batches]})
    return out


def _reference(case: dict) -> dict:
    completions = _batch()
    totals, _, metrics = _rewards()(*reward_inputs(completions, _prompts()))
    totals = torch.tensor(totals, dtype=torch.float32)
    stats = ops.grpo_advantage_stats(totals, group_size=GROUP_SIZE)
    dp_size = max(case["dp_of"]) + 1
    per_dp = [micro_batches(completions, stats.advantages, BUDGET, PAD, True, d, dp_size,
                            **_plan_kwargs(case)) for d in range(dp_size)]
    return {"totals": totals, "advantages": stats.advantages, "metrics": metrics,
            "zero_std": int(stats.num_zero_std_groups), "batches": per_dp}


def _assert_same_metrics(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if key.endswith("/seconds"):
            assert got[key] >= 0.0
        elif math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == value, key


def _check(results: list[list[dict]], cases: list[dict]) -> None:
    for k, case in enumerate(cases):
        want = _reference(case)
        assert want["zero_std"] >= 1 and len(want["batches"][0]) > 1  # the case bites
        if case["engine"] < len(results):  # some completions cross engines
            assert sum(per_case[k]["moved"] for per_case in results) > 0
        for rank, per_case in enumerate(results):
            got = per_case[k]
            assert torch.equal(got["totals"], want["totals"])
            assert torch.equal(got["advantages"], want["advantages"])
            assert got["zero_std"] == want["zero_std"]
            _assert_same_metrics(got["metrics"], want["metrics"])
            reference = want["batches"][case["dp_of"][rank]]
            assert len(got["batches"]) == len(reference)
            for mine, theirs in zip(got["batches"], reference):
                for f in FIELDS:
                    assert torch.equal(mine[f], getattr(theirs, f)), (case, rank, f)
            trained = sorted(int(i) for b in reference for i in b.index)
            assert got["received"] == trained  # its DP share, not the whole batch


def _layouts(world: int, engines: list[int], tps: list[int], strided: bool = False
             ) -> list[dict]:
    """Cases: engine size x trainer TP (DP rank = rank // tp, Megatron's order; `strided`
    adds DP rank = rank % dp), with a plain, an SP-padded and a uniform (PP) plan."""
    cases = []
    for e in engines:
        for tp in tps:
            dp = world // tp
            maps = [[r // tp for r in range(world)]]
            maps += [[r % dp for r in range(world)]] if strided and 1 < tp < world else []
            for i, dp_of in enumerate(maps):
                multiple, uniform = [(1, False), (4, False), (1, True)][(e + tp + i) % 3]
                cases.append({"engine": e, "dp_of": dp_of, "multiple": multiple,
                              "uniform": uniform})
    return cases


def test_exchange_equals_the_single_process_path_on_two_ranks():
    cases = _layouts(2, engines=[1, 2], tps=[1, 2])
    _check(run_world(_exchange_worker, cases, world_size=2), cases)


@pytest.mark.slow
def test_exchange_equals_the_single_process_path_on_four_ranks():
    cases = _layouts(4, engines=[1, 2, 4], tps=[1, 2], strided=True)
    _check(run_world(_exchange_worker, cases, world_size=4), cases)


@pytest.mark.parametrize("world,multiple,uniform", [(1, 1, False), (2, 1, False),
                                                    (3, 4, False), (2, 1, True)])
def test_plan_then_build_from_own_rows_equals_micro_batches_over_the_batch(world, multiple,
                                                                          uniform):
    completions = _batch()
    adv = torch.linspace(-1, 1, len(completions))
    plan = plan_micro_batches([len(c.prompt_ids) + len(c.completion_ids) for c in completions],
                              BUDGET, world, width_multiple=multiple, uniform=uniform)
    owners = plan.trainer_of(len(completions))
    assert sorted(i for r in range(world) for i in plan.positions(r)) == \
        list(range(len(completions)))
    for rank in range(world):
        assert plan.positions(rank) == [i for i, o in enumerate(owners) if o == rank]
        own = {i: completions[i] for i in plan.positions(rank)}
        built = build_micro_batches(plan, own, adv, PAD, False, rank)
        whole = micro_batches(completions, adv, BUDGET, PAD, False, rank, world,
                              width_multiple=multiple, uniform=uniform)
        assert len(built) == len(whole)
        for a, b in zip(built, whole):
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def test_build_names_the_completions_a_rank_lacks():
    completions = _batch()
    plan = plan_micro_batches([len(c.prompt_ids) + len(c.completion_ids) for c in completions],
                              BUDGET, 2)
    with pytest.raises(ValueError, match="data-parallel rank 1 lacks completions"):
        build_micro_batches(plan, {}, torch.zeros(len(completions)), PAD, rank=1)
