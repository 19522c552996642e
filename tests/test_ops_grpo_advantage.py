"""openr1_mega.ops.grpo_advantage / grpo_advantage_stats against independent float64 references.

The references here are written per group in plain Python/torch loops (not the scatter/view
code of ops.reference), so the kernel, the fallback reference and these agree independently.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openr1_mega import ops
from openr1_mega.ops import reference

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason="extension not built")


def _groups_of(ids):
    groups = {}
    for i, g in enumerate(ids):
        groups.setdefault(int(g), []).append(i)
    return [groups[k] for k in sorted(groups)]


def _f64(values):
    return torch.tensor(values, dtype=torch.float64)


def _expected(rewards, ids, scale, eps, unbiased):
    """Per-group loop in float64: (advantages, means, stds, zero-std count)."""
    r = rewards.double().reshape(-1)
    correction = 1 if unbiased else 0
    batch_std = r.std(correction=correction).item() if r.numel() > 1 else 0.0
    adv, means, stds, zero = torch.zeros_like(r), [], [], 0
    for members in _groups_of(ids):
        vals = r[members]
        mean = vals.mean().item()
        std = vals.std(correction=correction).item() if len(members) > 1 else 0.0
        denom = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        adv[members] = (vals - mean) / denom
        means.append(mean)
        stds.append(std)
        zero += int(bool((vals == vals[0]).all()))
    return adv, _f64(means), _f64(stds), zero


def _rewards(n, seed=0, levels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (n,), generator=g).float() / (levels - 1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("num_groups,group_size", [(1, 1), (7, 1), (5, 16), (3, 7), (2, 1024)])
def test_fixed_group_size_matches_reference(scale, unbiased, num_groups, group_size):
    r = _rewards(num_groups * group_size, seed=num_groups + group_size)
    out = ops.grpo_advantage_stats(r, group_size=group_size, scale=scale, unbiased=unbiased)
    adv, mean, std, zero = _expected(r, torch.arange(r.numel()) // group_size, scale, 1e-6,
                                     unbiased)
    assert out.advantages.dtype == torch.float32 and out.advantages.shape == r.shape
    torch.testing.assert_close(out.advantages.double(), adv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.group_mean.double(), mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.group_std.double(), std, rtol=1e-6, atol=1e-7)
    assert out.num_zero_std_groups.item() == zero
    assert out.token_advantages is None


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_variable_groups_via_group_ids(scale):
    ids = torch.tensor([42, 7, 42, 3, 7, 42, 42, 100, 7, 3, 42])  # sizes 2, 3, 5, 1
    r = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.3, 0.0, 1.0, 0.5], dtype=torch.float64)
    out = ops.grpo_advantage_stats(r, group_ids=ids, scale=scale)
    adv, mean, std, zero = _expected(r, ids, scale, 1e-6, True)
    assert out.advantages.dtype == torch.float64
    torch.testing.assert_close(out.advantages, adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.group_mean, mean, rtol=1e-12, atol=1e-12)  # sorted by id
    torch.testing.assert_close(out.group_std, std, rtol=1e-12, atol=1e-12)
    assert out.num_zero_std_groups.item() == zero == 2  # ids 3 (1.0, 1.0) and 100 (single)


def test_two_dim_rewards_are_prompt_by_completion():
    r = _rewards(4 * 6, seed=3).view(4, 6)
    adv = ops.grpo_advantage(r)
    assert adv.shape == (4, 6)
    torch.testing.assert_close(adv.reshape(-1), ops.grpo_advantage(r.reshape(-1), group_size=6))


def test_default_std_is_unbiased_like_trl():
    r = torch.tensor([0.0, 1.0, 1.0, 1.0])
    expected = (r - r.mean()) / (r.std(correction=1) + 1e-6)  # TRL's formula, one group
    torch.testing.assert_close(ops.grpo_advantage(r, group_size=4), expected)


def test_token_advantages_packed_layout():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])
    token_index = torch.tensor([0, 0, 1, -1, 3, 2, 2, 1])
    mask = torch.tensor([True, False, True, False, True, True, True, True])
    out = ops.grpo_advantage_stats(r, group_size=2, scale="none", token_index=token_index,
                                   response_mask=mask)
    torch.testing.assert_close(out.token_advantages,
                               torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, -0.5]))
    assert out.num_zero_std_groups.item() == 1


def test_matches_fallback_reference():
    r, ids = _rewards(300, seed=9), torch.randint(0, 40, (300,))
    for scale in ("group", "batch", "none"):
        got = ops.grpo_advantage(r, group_ids=ids, scale=scale, unbiased=False)
        _, index = torch.unique(ids, return_inverse=True)
        want = reference.grpo_advantage_reference(r, index, 1, int(ids.unique().numel()), scale,
                                                  1e-6, False)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_and_integer_rewards_compute_in_float32():
    r = torch.tensor([1, 0, 1, 1])
    torch.testing.assert_close(ops.grpo_advantage(r, group_size=2),
                               ops.grpo_advantage(r.float(), group_size=2))
    assert ops.grpo_advantage(r.bfloat16(), group_size=2).dtype == torch.float32


def test_opcheck():
    r = _rewards(24, seed=1)
    index = torch.arange(24) % 5
    tokens, mask = torch.arange(30) % 24, torch.arange(30) % 3 > 0
    op = torch.ops.openr1_mega.grpo_advantage.default
    torch.library.opcheck(op, (r, None, 8, 3, "group", 1e-6, True, None, None))
    torch.library.opcheck(op, (r.double(), index, 1, 5, "batch", 1e-6, False, tokens, mask))


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=8),
    shift=st.floats(-5, 5),
    gain=st.floats(0.5, 3.0),
    seed=st.integers(0, 2**16),
)
def test_property_centred_shift_invariant_permutation_equivariant(sizes, shift, gain, seed):
    ids = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))
    r = _rewards(ids.numel(), seed=seed, levels=5).double()
    adv = ops.grpo_advantage(r, group_ids=ids)
    for g in range(len(sizes)):  # each group's advantages are centred
        assert abs(adv[ids == g].sum().item()) < 1e-9
    shifted = ops.grpo_advantage(r + shift, group_ids=ids)  # shift invariance
    torch.testing.assert_close(shifted, adv, rtol=1e-9, atol=1e-9)
    centred = ops.grpo_advantage(r, group_ids=ids, scale="none")
    scaled = ops.grpo_advantage(gain * r, group_ids=ids, scale="none")  # "none" is linear
    torch.testing.assert_close(scaled, gain * centred, rtol=1e-9, atol=1e-12)
    shuffled = ops.grpo_advantage(r[perm], group_ids=ids[perm])  # permutation equivariance
    torch.testing.assert_close(shuffled, adv[perm], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(rewards=torch.zeros(6), group_size=4), "group_size"),
        (dict(rewards=torch.zeros(6)), "group_size"),
        (dict(rewards=torch.zeros(6), group_size=0), "group_size"),
        (dict(rewards=torch.zeros(6), group_size=2, group_ids=torch.zeros(6)), "group_ids"),
        (dict(rewards=torch.zeros(6), group_ids=torch.zeros(5, dtype=torch.long)), "group_ids"),
        (dict(rewards=torch.zeros(6), group_ids=torch.zeros(6)), "group_ids"),
        (dict(rewards=torch.zeros(6), group_size=2, scale="std"), "scale"),
        (dict(rewards=torch.zeros(6), group_size=2, eps=-1.0), "eps"),
        (dict(rewards=torch.zeros(6), group_size=2, eps=math.inf), "eps"),
        (dict(rewards=torch.zeros(2, 3, 1), group_size=2), "rewards"),
    ],
)
def test_errors_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        ops.grpo_advantage(**kwargs)


@pytest.mark.parametrize(
    "token_index, response_mask, arg",
    [
        (torch.tensor([0, 6]), torch.tensor([True, True]), "token_index"),
        (torch.tensor([0, 1]), None, "response_mask"),
        (torch.tensor([0, 1]), torch.tensor([True]), "response_mask"),
    ],
)
def test_token_layout_errors(token_index, response_mask, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        ops.grpo_advantage_stats(torch.zeros(6), group_size=2, token_index=token_index,
                                 response_mask=response_mask)


def test_raw_op_checks_group_index():
    with pytest.raises(ValueError, match="^group_index"):
        torch.ops.openr1_mega.grpo_advantage(torch.zeros(4), torch.tensor([0, 1, 2, 3]), 1, 3,
                                             "group", 1e-6, True, None, None)
