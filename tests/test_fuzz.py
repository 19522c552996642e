"""Property (fuzz) tests: kernels equal their references, rewards never raise or hang, and the
recipe loader gives a valid recipe or a clear error, whatever hypothesis throws at them.

Targets and example counts (all `deadline=None`; the file runs in about a minute on 2 cores):
  token_logprob kernel vs float64 reference   EXAMPLES["token_logprob"]
  grpo_advantage kernel vs reference           EXAMPLES["grpo_advantage"] (x2: sizes, ids)
  every registered reward on random text       EXAMPLES["rewards"] (code: EXAMPLES["code"])
  recipe loader: random YAML and overrides     EXAMPLES["recipe"] (x3: mapping, text, overrides)
What existing tests already cover is not repeated (tests/test_ops_*.py: random logits at one
scale, bf16/fp16 error bounds, gradcheck, opcheck; advantage invariances).
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from openr1_mega import ops
from openr1_mega.ops import reference
from openr1_mega.ops._extension import extension_loaded

EXAMPLES = {"token_logprob": 60, "grpo_advantage": 60, "rewards": 25, "code": 8, "recipe": 150}
PRIMES = [2, 3, 5, 7, 11, 13, 31, 127, 257, 1021, 4099]
FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}

needs_kernels = pytest.mark.skipif(not extension_loaded(),
                                   reason="compiled extension not built: nothing to compare")


def _sizes(small: int) -> st.SearchStrategy[int]:
    """1, primes, and anything in between (hypothesis shrinks towards 1)."""
    return st.one_of(st.just(1), st.sampled_from(PRIMES), st.integers(1, small))


# ---- token_logprob ----------------------------------------------------------------------


def _fuzz_logits(n, v, dtype, scale, masked, levels, seed):
    """[n, v] logits at `scale`, a `masked` share at -inf (never a whole row), and `levels`
    distinct values only when > 0 (ties, including rows of equal logits)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=gen, dtype=torch.float64) * scale
    if levels:
        x = (torch.randint(0, levels, (n, v), generator=gen) * scale).double()
    mask = torch.rand(n, v, generator=gen) < masked
    mask[torch.arange(n), torch.randint(0, v, (n,), generator=gen)] = False
    x[mask] = -math.inf
    targets = torch.randint(0, v, (n,), generator=gen)
    return x.to(dtype), targets


def _logprob_and_grads(fn, x, t, temperature):
    """(logp, entropy, d(sum of finite logp + sum of entropy)/dlogits) of `fn` at x."""
    x = x.clone().requires_grad_()
    logp, ent = fn(x, t, temperature)
    (logp.masked_fill(torch.isinf(logp), 0).sum() + ent.sum()).backward()
    return logp.detach(), ent.detach(), x.grad


def _assert_within_twice_plain(got, plain, ref, floor):
    """The kernel's error against float64 is at most twice plain PyTorch's in the same dtype
    (STYLE.md), plus `floor` relative to the values' size (fp32 logits of 1e4 at T=0.1 are
    ill-conditioned for both); infinities must agree exactly."""
    got, plain = got.double(), plain.double()
    inf = torch.isinf(ref)
    assert torch.equal(got[inf], ref[inf]) and not torch.isnan(got).any()
    err = (got[~inf] - ref[~inf]).abs().max().item() if (~inf).any() else 0.0
    plain_err = (plain[~inf] - ref[~inf]).abs().max().item() if (~inf).any() else 0.0
    size = max(1.0, ref[~inf].abs().max().item()) if (~inf).any() else 1.0
    assert err <= 2 * plain_err + floor * size, (err, plain_err, size)


@needs_kernels
@settings(max_examples=EXAMPLES["token_logprob"], **FUZZ)
@given(n=_sizes(16), v=_sizes(600), dtype=st.sampled_from([torch.float32, torch.float64]),
       scale=st.sampled_from([1e-4, 1.0, 30.0, 1e3, 1e4]), masked=st.sampled_from([0, 0.3, 0.9]),
       levels=st.sampled_from([0, 0, 1, 2, 3]), temperature=st.floats(0.1, 10.0),
       seed=st.integers(0, 2**16))
def test_token_logprob_kernel_equals_reference(n, v, dtype, scale, masked, levels,
                                               temperature, seed):
    x, t = _fuzz_logits(n, v, dtype, scale, masked, levels, seed)
    got = _logprob_and_grads(ops.token_logprob_entropy, x, t, temperature)
    plain = _logprob_and_grads(reference.token_logprob_entropy_reference, x, t, temperature)
    ref = _logprob_and_grads(reference.token_logprob_entropy_reference, x.double(), t,
                             temperature)
    floor = 1e-5 if dtype == torch.float32 else 1e-12  # fp32: the rtol of test_ops_token_logprob
    for g, p, r in zip(got[:2], plain[:2], ref[:2], strict=True):
        _assert_within_twice_plain(g, p, r, floor)
    # backward recomputes p = exp(z - lse) from the saved lse, so in the logits' dtype it
    # carries the rounding of z itself: a few ulp of max|z| (found by this test; plain
    # log_softmax subtracts the max first and is exact at the argmax)
    z_max = (x[torch.isfinite(x)].double().abs().max() / temperature).item()
    _assert_within_twice_plain(got[2], plain[2], ref[2],
                               floor + 8 * torch.finfo(dtype).eps * z_max)
    assert (got[0] <= 1e-6).all() and (got[1] >= -1e-6).all()


# ---- grpo_advantage ---------------------------------------------------------------------

SPECIAL_REWARDS = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e6, -1e6, 1e15, 0.5]


def _fuzz_rewards(count, dtype, levels, special, seed):
    gen = torch.Generator().manual_seed(seed)
    if levels:  # ties: whole groups of equal rewards are common
        r = torch.randint(0, levels, (count,), generator=gen).double()
    else:
        r = torch.randn(count, generator=gen, dtype=torch.float64)
    if special:
        picks = torch.randint(0, len(SPECIAL_REWARDS), (count,), generator=gen)
        r = torch.where(torch.rand(count, generator=gen) < 0.5,
                        torch.tensor(SPECIAL_REWARDS, dtype=torch.float64)[picks], r)
    return r.to(dtype)


def _assert_stats_equal(got, want, dtype, rewards, group_index):
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12,
                                                                        "atol": 1e-12}
    tol["equal_nan"] = True  # eps=0 on an all-equal group is 0/0 in both (op allows eps=0)
    adv, token_adv, mean, std, zero = want
    torch.testing.assert_close(got.advantages.reshape(-1), adv, **tol)
    for name, value, ref in (("mean", got.group_mean, mean), ("std", got.group_std, std)):
        _assert_group_sums_close(name, value.to(ref.dtype), ref, rewards, group_index, tol)
    assert int(got.num_zero_std_groups) == int(zero)
    if got.token_advantages is not None:
        torch.testing.assert_close(got.token_advantages, token_adv, **tol)


def _assert_group_sums_close(name, got, want, rewards, group_index, tol):
    """Group means/stds are sums over the group: in another summation order they differ by up
    to ~n x eps x max|r| (n the group size). With special rewards (up to 1e14) a fixed 1e-12
    is below one ulp of the sum, so the bound scales with each group's largest reward."""
    n_groups = want.numel()
    magnitude = torch.zeros(n_groups, dtype=torch.float64).scatter_reduce(
        0, group_index, rewards.double().abs().nan_to_num(0.0, 0.0, 0.0), "amax")
    sizes = torch.bincount(group_index, minlength=n_groups).double()
    bound = (tol["atol"] + 4 * sizes * torch.finfo(rewards.dtype).eps * magnitude
             + tol["rtol"] * want.abs().double())
    close = ((got - want).abs().double() <= bound) | (got == want) | (got.isnan() & want.isnan())
    assert bool(close.all()), \
        f"group {name}: {got[~close]} vs {want[~close]} (bound {bound[~close]})"


@needs_kernels
@settings(max_examples=EXAMPLES["grpo_advantage"], **FUZZ)
@given(groups=_sizes(40), group_size=_sizes(64), dtype=st.sampled_from([torch.float32,
                                                                        torch.float64]),
       scale=st.sampled_from(["group", "batch", "none"]), unbiased=st.booleans(),
       eps=st.sampled_from([0.0, 1e-6, 1.0]), levels=st.sampled_from([0, 1, 2, 3]),
       special=st.booleans(), seed=st.integers(0, 2**16))
@example(groups=5, group_size=7, dtype=torch.float64, scale="group", unbiased=False, eps=0.0,
         levels=0, special=True, seed=0)  # found by CI: sums of 1e14-scale rewards
def test_grpo_advantage_kernel_equals_reference(groups, group_size, dtype, scale, unbiased, eps,
                                                levels, special, seed):
    count = groups * group_size
    if count > 5000:
        group_size = max(1, 5000 // groups)
        count = groups * group_size
    r = _fuzz_rewards(count, dtype, levels, special, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(-1, count, (3 * count,), generator=gen)
    mask = tokens >= 0
    got = ops.grpo_advantage_stats(r, group_size=group_size, scale=scale, eps=eps,
                                   unbiased=unbiased, token_index=tokens, response_mask=mask)
    want = reference.grpo_advantage_reference(r, None, group_size, groups, scale, eps, unbiased,
                                              tokens, mask)
    _assert_stats_equal(got, want, dtype, r, torch.arange(count) // group_size)


@needs_kernels
@settings(max_examples=EXAMPLES["grpo_advantage"], **FUZZ)
@given(count=_sizes(300), groups=_sizes(40), dtype=st.sampled_from([torch.float32,
                                                                    torch.float64]),
       scale=st.sampled_from(["group", "batch", "none"]), unbiased=st.booleans(),
       levels=st.sampled_from([0, 1, 2]), special=st.booleans(), seed=st.integers(0, 2**16))
def test_grpo_advantage_with_group_ids_equals_reference(count, groups, dtype, scale, unbiased,
                                                        levels, special, seed):
    r = _fuzz_rewards(count, dtype, levels, special, seed)
    ids = torch.randint(0, groups, (count,), generator=torch.Generator().manual_seed(seed))
    got = ops.grpo_advantage_stats(r, group_ids=ids * 7 - 3, scale=scale, unbiased=unbiased)
    dense = torch.unique(ids, return_inverse=True)[1]
    want = reference.grpo_advantage_reference(r, dense, 1, int(dense.max()) + 1, scale, 1e-6,
                                              unbiased)
    _assert_stats_equal(got, want, dtype, r, dense)


# ---- rewards ------------------------------------------------------------------------------

FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "}", "{", "\\frac{1}{2}",
             "$", "$$", "\\[", "\\]", "42", "-3.5", "x^2", "\n", "Step 1:", "```python\n",
             "```", "print(input())", "\\sqrt{", "\u00e9", "\U0001f600", "\x00", "\\left(",
             "\\infty", "1e308", "nan", "1/0", "=", " "]
completion_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=8), max_size=40).map("".join),
    st.builds(lambda s, k: s * k, st.sampled_from(FRAGMENTS), st.integers(1, 2000)),
)
REWARD_OPTIONS = {"accuracy": {"workers": 1}, "cosine": {"workers": 1},
                  "length": {"workers": 1}, "code": {"workers": 1, "wall_seconds": 2.0}}


def _columns(completions, golds, lengths):
    n = len(completions)
    return {"answer": golds, "prompt": [f"p{i % 2}" for i in range(n)],
            "completion_lengths": lengths,
            "test_cases": ['[{"input": "1", "output": "1"}]'] * n}


def _check_reward(name, completions, golds, lengths):
    from openr1_mega.rl.rewards import RewardSet, get_reward

    columns = _columns(completions, golds, lengths)
    reward = get_reward(name, **REWARD_OPTIONS.get(name, {}))
    values = reward(completions, **columns)  # straight through the registry: must not raise
    assert isinstance(values, list) and len(values) == len(completions)
    assert all(v is None or (isinstance(v, float | int) and math.isfinite(v)) for v in values)
    rewards = RewardSet.from_spec({name: 1.0}, {name: REWARD_OPTIONS.get(name, {})},
                                  timeout=120.0)
    _, _, metrics = rewards(completions, columns)
    assert metrics[f"{name}/errors"] == 0 and metrics[f"{name}/deadline_misses"] == 0


def _reward_names():
    from openr1_mega.rl.rewards import reward_names

    return [n for n in reward_names() if not n.startswith("test_") and n != "code"]


batch = st.integers(1, 4).flatmap(lambda n: st.tuples(
    st.lists(completion_text, min_size=n, max_size=n),
    st.lists(st.none() | st.sampled_from(["42", "\\frac{1}{2}", "x^2", ""]) | st.text(max_size=10),
             min_size=n, max_size=n),
    st.lists(st.integers(0, 40000), min_size=n, max_size=n)))


@pytest.mark.parametrize("name", _reward_names())
@settings(max_examples=EXAMPLES["rewards"], **FUZZ)
@given(data=batch)
def test_reward_never_raises_and_stays_in_its_limit(name, data):
    _check_reward(name, *data)


@settings(max_examples=EXAMPLES["code"], **FUZZ)
@given(data=batch)
def test_code_reward_never_raises_and_stays_in_its_limit(data):
    completions, golds, lengths = data
    completions = [f"```python\n{c}\n```" if i % 2 else c for i, c in enumerate(completions)]
    _check_reward("code", completions, golds, lengths)


# ---- recipe loader --------------------------------------------------------------------------


def _recipe_fields():
    """(section, field) names of the GRPO and SFT recipes, for near-valid random recipes."""
    import dataclasses

    from openr1_mega.train.grpo import GrpoRecipe
    from openr1_mega.train.sft import SftRecipe

    out = {}
    for recipe in (GrpoRecipe, SftRecipe):
        for section in dataclasses.fields(recipe):
            out.setdefault(section.name, set()).update(
                f.name for f in dataclasses.fields(section.type if isinstance(section.type, type)
                                                   else section.default_factory))
    return {k: sorted(v) for k, v in out.items()}


SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats()
           | st.text(max_size=12) | st.sampled_from(["auto", "bf16", "fp32", "dapo", "group",
                                                    "skip", "error", "1e-5", "", "accuracy"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3),
                      max_leaves=6)


@st.composite
def recipes(draw):
    """A mapping of known sections and fields (plus some unknown ones) to random values."""
    fields = _recipe_fields()
    doc = {}
    for section in draw(st.lists(st.sampled_from(sorted(fields)) | st.text(max_size=5),
                                 max_size=4, unique=True)):
        names = fields.get(section, ["x"])
        keys = draw(st.lists(st.sampled_from(names) | st.text(max_size=5) | st.integers(0, 9),
                             max_size=4, unique=True))
        doc[section] = draw(st.fixed_dictionaries({k: VALUES for k in keys}) | VALUES)
    return doc


def _load(tmp_path, text, overrides=()):
    from openr1_mega.config.load import load_config
    from openr1_mega.train.grpo import GrpoRecipe

    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    try:
        return load_config(path, list(overrides), GrpoRecipe)
    except (ValueError, KeyError) as err:  # the only allowed failures: a clear message
        assert str(err).strip(), "an error without a message"
        return err


@settings(max_examples=EXAMPLES["recipe"], **FUZZ)
@given(doc=recipes())
def test_random_recipe_mapping_loads_or_names_the_problem(tmp_path_factory, doc):
    _load(tmp_path_factory.mktemp("r"), yaml.safe_dump(doc))


@settings(max_examples=EXAMPLES["recipe"], **FUZZ)
@given(text=st.text(max_size=200) | st.lists(st.sampled_from(
    ["grpo:", "  steps: 3", "model: {path: x}", "- 1", ": :", "{", "]", "\t", "run:",
     "  seed: 1.5", "&a [*a]", "!!python/object:os.system", "? x", "%YAML 1.1", "---"]),
    max_size=8).map("\n".join))
def test_random_recipe_text_loads_or_names_the_problem(tmp_path_factory, text):
    result = _load(tmp_path_factory.mktemp("r"), text)
    if isinstance(result, Exception) and "not valid YAML" in str(result):
        assert "recipe.yaml" in str(result)


@settings(max_examples=EXAMPLES["recipe"], **FUZZ)
@given(overrides=st.lists(st.tuples(
    st.sampled_from(["grpo.steps", "run.seed", "data.on_bad_row", "optim.lr", "grpo.rewards",
                     "rollout", "grpo.rewards.accuracy", "model.path", "x.y", "", ".", "a..b"])
    | st.text(max_size=10), st.text(max_size=12)).map("=".join) | st.text(max_size=15),
    max_size=4))
def test_random_overrides_load_or_name_the_problem(tmp_path_factory, overrides):
    _load(tmp_path_factory.mktemp("r"), "grpo: {steps: 2}\n", overrides)
