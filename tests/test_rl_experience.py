"""Micro-batching of a rollout batch: token budget, same shapes on every DP rank, coverage."""

import pytest
import torch

from openr1_mega.rl.experience import micro_batches
from openr1_mega.rl.types import Completion


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


def test_only_completion_tokens_are_scored_each_at_the_position_before_it():
    c = Completion(0, [1, 2, 3], [4, 5], "", "stop", logprobs=[-0.1, -0.2])
    (b,) = micro_batches([c], torch.tensor([1.0]), 64, pad_id=0)
    assert b.input_ids[0].tolist() == [1, 2, 3, 4, 5] and b.shared is None
    assert b.targets[0].tolist() == [4, 5]
    assert b.sources[0].tolist() == [2, 3]  # token 4 is predicted at position 2 (token 3)
    assert b.mask[0].tolist() == [1, 1]
    assert b.sampler_logprobs[0].tolist() == pytest.approx([-0.1, -0.2])


def test_shared_prompt_row_scores_every_completion_after_one_prompt():
    """Row: prompt [1, 2, 3], then completions [4, 5] and [6, 7, 8]; the second one's first
    token is predicted at the prompt's last position, its positions continue the prompt's,
    and it never sees the first completion."""
    completions = [Completion(0, [1, 2, 3], [4, 5], "", "stop", logprobs=[-0.1, -0.2]),
                   Completion(0, [1, 2, 3], [6, 7, 8], "", "stop", logprobs=[-0.3] * 3)]
    (b,) = micro_batches(completions, torch.tensor([1.0, -1.0]), 64, pad_id=0,
                         shared_prompt=True)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert b.targets.tolist() == [[4, 5, 0], [6, 7, 8]]
    assert b.sources.tolist() == [[2, 3, 0], [2, 5, 6]]
    assert b.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.advantages.tolist() == [1.0, -1.0] and b.index.tolist() == [0, 1]
    layout = b.shared  # one row: flat index = position
    assert layout.prompt_tokens.tolist() == [[0, 1, 2]]
    assert layout.completion_tokens.tolist() == [[3, 4, 0], [5, 6, 7]]
    assert layout.completion_keys[1].tolist() == [0, 1, 2, 5, 6, 7]  # prompt + itself only
    assert layout.completion_mask[1, 0, 1].tolist() == [1, 1, 1, 1, 1, 0]  # token 7: causal


@pytest.mark.parametrize("world", [1, 2])
def test_shared_prompt_rows_cover_every_completion_within_the_budget(world):
    completions, adv = _batch(), torch.arange(11, dtype=torch.float32)
    for c in completions:  # the completions of a prompt share it
        c.prompt_ids = [1] * (3 + c.prompt_index)
    per_rank = [micro_batches(completions, adv, 24, pad_id=0, rank=r, world=world,
                              shared_prompt=True) for r in range(world)]
    seen = sorted(int(i) for batches in per_rank for b in batches for i in b.index)
    assert seen == list(range(11))
    for batches in per_rank:
        for b in batches:
            assert b.input_ids.numel() <= 24
            assert torch.equal(b.advantages[:len(b.index)], adv[b.index])
            for k, i in enumerate(b.index.tolist()):
                expected = completions[i].completion_ids
                assert b.targets[k, :len(expected)].tolist() == expected
                row = int(b.sources[k, 0]) % b.input_ids.shape[0]
                prompt = completions[i].prompt_ids
                assert b.input_ids[row, :len(prompt)].tolist() == prompt
    # the shared rows hold fewer tokens than one row per completion
    shared = sum(int((b.input_ids != 0).sum()) for batches in per_rank for b in batches)
    assert shared < sum(len(c.prompt_ids) + len(c.completion_ids) for c in completions)


def test_truncated_completions_can_be_masked():
    completions = _batch(5)
    (b,) = micro_batches(completions[:1], torch.ones(1), 64, 0, mask_truncated=True)
    assert completions[0].truncated and b.mask.sum() == 0


def test_overlong_completion_is_an_error_naming_the_budget():
    with pytest.raises(ValueError, match="micro_batch_tokens=8"):
        micro_batches(_batch(2), torch.ones(2), 8, pad_id=0)


def test_micro_batches_are_built_on_the_requested_device():
    """Device discipline without a GPU: every tensor the loop hands to the model, the loss or a
    collective is created for the model's device (meta here), never left on the host."""
    batches = micro_batches(_batch(), torch.arange(11, dtype=torch.float32), 40, pad_id=0,
                            world=2, device=torch.device("meta"))
    for b in batches:
        for name in ("input_ids", "position_ids", "sources", "targets", "mask",
                     "sampler_logprobs", "advantages", "index"):
            assert getattr(b, name).device.type == "meta", name


@pytest.mark.parametrize("multiple", [2, 4])
def test_widths_padded_for_sequence_parallel_without_changing_the_loss_tokens(multiple):
    completions, adv = _batch(), torch.arange(11, dtype=torch.float32)
    plain = micro_batches(completions, adv, 64, pad_id=0)
    padded = micro_batches(completions, adv, 64, pad_id=0, width_multiple=multiple)
    assert all(b.input_ids.shape[1] % multiple == 0 for b in padded)
    # the same tokens get loss, with the same sampler log-probs: padding never enters
    assert _masked_sampler_sums(padded) == pytest.approx(_masked_sampler_sums(plain))


def _masked_sampler_sums(batches) -> dict[int, float]:
    """Completion index -> sum of its masked sampler log-probs."""
    return {int(i): float((b.sampler_logprobs[r] * b.mask[r]).sum())
            for b in batches for r, i in enumerate(b.index)}


def test_uniform_plan_gives_one_shape_for_the_pipeline_schedule():
    completions, adv = _batch(), torch.arange(11, dtype=torch.float32)
    for rank in range(2):
        batches = micro_batches(completions, adv, 40, pad_id=0, rank=rank, world=2,
                                width_multiple=2, uniform=True)
        assert len({tuple(b.input_ids.shape) for b in batches}) == 1
        assert batches[0].input_ids.numel() <= 40
    seen = sorted(int(i) for r in range(2) for b in micro_batches(
        completions, adv, 40, pad_id=0, rank=r, world=2, uniform=True) for i in b.index)
    assert seen == list(range(11))
