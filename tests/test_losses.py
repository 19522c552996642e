"""policy_loss against a float64 reference written element by element from the formulas."""

import math

import pytest
import torch

from openr1_mega.rl.losses import LOSS_TYPES, policy_loss


def _reference(logp, old, adv, mask, loss_type, eps_low, eps_high, beta, ref, max_len):
    """Scalar loops straight from the DeepSeekMath / DAPO / Dr.GRPO definitions."""
    B, T = len(logp), len(logp[0])
    token_losses = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            r = math.exp(logp[b][t] - old[b][t])
            clipped = min(max(r, 1 - eps_low), 1 + eps_high)
            value = -min(r * adv[b], clipped * adv[b])
            if beta:
                d = ref[b][t] - logp[b][t]
                value += beta * (math.exp(d) - d - 1)
            token_losses[b][t] = value * mask[b][t]
    if loss_type == "grpo":
        return sum(sum(row) / max(sum(m), 1) for row, m in zip(token_losses, mask)) / B
    total = sum(map(sum, token_losses))
    if loss_type in ("bnpo", "dapo"):
        return total / max(sum(map(sum, mask)), 1)
    return total / (B * max_len)


def _batch(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1, 5])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_reference(loss_type, beta):
    logp, old, adv, mask, ref = _batch()
    loss, metrics = policy_loss(logp, old, adv, mask, loss_type=loss_type, eps_low=0.2,
                                eps_high=0.28, beta=beta, ref_logprobs=ref,
                                max_completion_length=10)
    expected = _reference(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), loss_type,
                          0.2, 0.28, beta, ref.tolist(), 10)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert 0 <= metrics["clip/region"].item() <= 1
    assert ("kl" in metrics) == (beta > 0)


def test_on_policy_gradient_is_advantage_weighted_logprob_gradient():
    """With old = logp.detach() (mu = 1) the ratio is 1 and d loss / d logp = -A mask / count."""
    logp, _, adv, mask, _ = _batch()
    logp.requires_grad_(True)
    loss, metrics = policy_loss(logp, logp.detach(), adv, mask, loss_type="bnpo")
    loss.backward()
    expected = -adv[:, None] * mask / mask.sum()
    torch.testing.assert_close(logp.grad, expected)
    assert metrics["clip/region"].item() == 0.0 and metrics["ratio/mean"].item() == 1.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_with_global_denominator_sum_to_full_batch(loss_type):
    logp, old, adv, mask, _ = _batch()
    full, _ = policy_loss(logp, old, adv, mask, loss_type=loss_type, max_completion_length=7)
    denominator = {"grpo": 4, "bnpo": mask.sum(), "dapo": mask.sum(), "dr_grpo": 4 * 7}[loss_type]
    parts = sum(policy_loss(logp[s], old[s], adv[s], mask[s], loss_type=loss_type,
                            max_completion_length=7, denominator=float(denominator))[0]
                for s in (slice(0, 1), slice(1, 4)))
    assert parts.item() == pytest.approx(full.item(), rel=1e-12)


def test_clip_higher_counts_each_side():
    logp = torch.zeros(2, 1, dtype=torch.float64)
    old = torch.log(torch.tensor([[1 / 1.5], [1 / 0.5]], dtype=torch.float64))  # r = 1.5, 0.5
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, m = policy_loss(logp, old, adv, torch.ones(2, 1), loss_type="bnpo", eps_low=0.2,
                          eps_high=0.28)
    assert m["clip/high"].item() == 0.5 and m["clip/low"].item() == 0.5
    assert loss.item() == pytest.approx(-(1.28 * 1 + 0.8 * -1) / 2)


def test_truncated_importance_sampling_weight_is_capped():
    logp, old, adv, mask, _ = _batch()
    sampler = old - 5.0  # the sampler thought these tokens very unlikely: weight capped at 2
    plain, _ = policy_loss(logp, old, adv, mask, loss_type="bnpo")
    corrected, _ = policy_loss(logp, old, adv, mask, loss_type="bnpo",
                               sampler_logprobs=sampler, tis_cap=2.0)
    assert corrected.item() == pytest.approx(2.0 * plain.item(), rel=1e-12)


def test_masked_rows_do_not_count():
    logp, old, adv, mask, _ = _batch()
    mask[1] = 0
    loss, _ = policy_loss(logp, old, adv, mask, loss_type="bnpo")
    keep = [0, 2, 3]
    expected, _ = policy_loss(logp[keep], old[keep], adv[keep], mask[keep], loss_type="bnpo")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_type": "ppo"}, "loss_type"),
    ({"beta": 0.1}, "ref_logprobs"),
    ({"loss_type": "dr_grpo"}, "max_completion_length"),
    ({"tis_cap": 2.0}, "sampler_logprobs"),
    ({"eps_low": -0.1}, "eps_low"),
])
def test_bad_arguments_name_the_problem(kwargs, message):
    logp, old, adv, mask, _ = _batch()
    with pytest.raises(ValueError, match=message):
        policy_loss(logp, old, adv, mask, **kwargs)


def test_shape_mismatch_names_the_argument():
    logp, old, adv, mask, _ = _batch()
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logp, old, adv, mask[:, :3])
