"""Micro-batching of a rollout batch: token budget, same shapes on every DP rank, coverage."""

import pytest
import torch

from openr1_mega.rl.experience import micro_batches
from openr1_mega.rl.rollout import Completion


def _batch(n=11):
    return [Completion(i // 4, [1] * (3 + i % 3), [7] * (2 + (5 * i) % 9), "",
                       "length" if i % 5 == 0 else "stop", logprobs=[-0.5] * (2 + (5 * i) % 9))
            for i in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_completion_once_with_equal_shapes_across_ranks(world):
    completions, adv = _batch(), torch.arange(11, dtype=torch.float32)
    per_rank = [micro_batches(completions, adv, 40, pad_id=0, rank=r, world=world)
                for r in range(world)]
    seen = sorted(int(i) for batches in per_rank for b in batches for i in b.index)
    assert seen == list(range(11))
    for step in zip(*per_rank):
        assert len({tuple(b.input_ids.shape) for b in step}) == 1
        assert all(b.input_ids.numel() <= 40 for b in step)
    for batches in per_rank:
        for b in batches:
            real = len(b.index)
            assert torch.equal(b.advantages[:real], adv[b.index])
            assert b.mask[real:].sum() == 0 and b.advantages[real:].abs().sum() == 0


def test_mask_covers_completion_targets_only():
    c = Completion(0, [1, 2, 3], [4, 5], "", "stop", logprobs=[-0.1, -0.2])
    (b,) = micro_batches([c], torch.tensor([1.0]), 64, pad_id=0)
    assert b.input_ids[0].tolist() == [1, 2, 3, 4, 5]
    assert b.targets[0].tolist() == [2, 3, 4, 5]
    assert b.mask[0].tolist() == [0, 0, 1, 1]
    assert b.sampler_logprobs[0].tolist() == pytest.approx([0, 0, -0.1, -0.2])


def test_truncated_completions_can_be_masked():
    completions = _batch(5)
    (b,) = micro_batches(completions[:1], torch.ones(1), 64, 0, mask_truncated=True)
    assert completions[0].truncated and b.mask.sum() == 0


def test_overlong_completion_is_an_error_naming_the_budget():
    with pytest.raises(ValueError, match="micro_batch_tokens=8"):
        micro_batches(_batch(2), torch.ones(2), 8, pad_id=0)
