"""Format, tag count, reasoning steps, length shaping and repetition rewards on hand-made texts."""

from __future__ import annotations

import math

import pytest

from openr1_mega.rl.rewards import get_reward

R1 = "<think>\nLet me think.\n</think>\n<answer>\n\\boxed{4}\n</answer>"
LONG = "a " * 50_000  # 100k characters


def score(name, completions, **kwargs):
    columns = {k: v for k, v in kwargs.items() if not k.startswith("p_")}
    params = {k[2:]: v for k, v in kwargs.items() if k.startswith("p_")}
    return get_reward(name, **params)(completions, **columns)


@pytest.mark.parametrize("completion, strict, soft", [
    (R1, 1.0, 1.0),
    ("  <think>x</think> <answer>4</answer>\n", 1.0, 1.0),
    ("<think>x</think><answer>4</answer> trailing text", 0.0, 1.0),
    ("preamble <think>x</think>\n<answer>4</answer>", 0.0, 1.0),
    ("<think></think><answer>4</answer>", 0.0, 1.0),
    ("<think>x</think><answer>4</answer><answer>5</answer>", 0.0, 1.0),
    ("<think>a<think>b</think><answer>4</answer>", 0.0, 1.0),
    ("<answer>4</answer><think>x</think>", 0.0, 0.0),
    ("<think>x</think>", 0.0, 0.0),
    ("", 0.0, 0.0),
    ("<think>思考 🤔</think><answer>四</answer>", 1.0, 1.0),
    (LONG, 0.0, 0.0),
    ("<think>" + LONG + "</think><answer>4</answer>", 1.0, 1.0),
    # adversarial: quadratic for a naive regex
    ("<think>" + "</think><answer>" * 6000, 0.0, 0.0),
    ("<think>x</think> " * 6000, 0.0, 0.0),
    ("<think>" * 14_000 + "</think><answer>", 0.0, 0.0),
    ("<think>" * 14_000 + "</think><answer>4</answer>", 0.0, 1.0),
])
def test_format_and_soft_format(completion, strict, soft):
    assert score("format", [completion]) == [strict]
    assert score("soft_format", [completion]) == [soft]


def test_format_options():
    custom = "<reasoning>x</reasoning><solution>4</solution>"
    assert score("format", [custom], p_think_tag="reasoning", p_answer_tag="solution") == [1.0]
    assert score("format", [custom]) == [0.0]
    opened = "Let me think.\n</think>\n<answer>\n4\n</answer>"
    assert score("format", [opened], p_prompt_opens_think=True) == [1.0]
    assert score("tag_count", [opened], p_prompt_opens_think=True) == [1.0]
    with pytest.raises(ValueError, match="think_tag"):
        get_reward("format", think_tag="<think>")


@pytest.mark.parametrize("completion, expected", [
    (R1, 1.0),
    ("<think>\nx\n</think>\n", 0.5),
    ("<think>\nx\n</think>\n<answer>\n4", 0.75),
    ("<think>\nx\n</think>\n<think>\ny\n</think>\n<answer>\n4\n</answer>", 0.5),
    ("<think>x</think><answer>4</answer>", 0.0),
    ("", 0.0),
])
def test_tag_count(completion, expected):
    assert score("tag_count", [completion]) == [expected]


@pytest.mark.parametrize("completion, expected", [
    ("Step 1: add. Step 2: multiply. Step 3: done.", 1.0),
    ("First, add. Next, multiply.", 2 / 3),
    ("1. add\n2. multiply\n3. check\n4. done", 1.0),
    ("Plan:\n- add\n* multiply", 2 / 3),
    ("Just the answer: 4", 0.0),
    ("", 0.0),
])
def test_reasoning_steps(completion, expected):
    assert score("reasoning_steps", [completion]) == [pytest.approx(expected)]
    assert score("reasoning_steps", [completion], p_min_steps=1) == [min(1.0, expected * 3)]


def test_cosine_scaled_length_reward():
    texts = ["\\boxed{4}", "\\boxed{5}", "\\boxed{4}", "\\boxed{5}", "\\boxed{4}", "\\boxed{4}"]
    lengths = [0, 0, 1000, 1000, 500, 5000]
    values = score("cosine", texts, answer=["4"] * 6, completion_lengths=lengths)
    # correct: 1.0 at length 0 down to 0.5 at max_len; wrong: -1.0 at 0 up to -0.5
    assert values == pytest.approx([1.0, -1.0, 0.5, -0.5, 0.75, 0.5])
    quarter = score("cosine", ["\\boxed{4}"], answer=["4"], completion_lengths=[250],
                    p_max_len=1000, p_min_value_correct=0.0, p_max_value_correct=1.0)
    assert quarter == [pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))]


def test_cosine_falls_back_to_characters_and_skips_unverifiable():
    values = score("cosine", ["\\boxed{4}" + " " * 991, "\\boxed{4}"], answer=["4", None])
    assert values == [pytest.approx(0.5), None]


@pytest.mark.parametrize("length, expected", [
    (0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (17, -1.0), (10_000, -1.0)])
def test_soft_overlong_punishment(length, expected):
    values = score("soft_overlong_punishment", ["x"], completion_lengths=[length],
                   p_max_completion_length=16, p_soft_punish_cache=4)
    assert values == [expected]


def test_soft_overlong_checks_its_options():
    with pytest.raises(ValueError, match="soft_punish_cache"):
        get_reward("soft_overlong_punishment", max_completion_length=8, soft_punish_cache=9)


def test_kimi_length_reward_is_relative_within_each_prompt_group():
    texts = ["\\boxed{4}", "\\boxed{4}", "\\boxed{5}", "\\boxed{5}", "\\boxed{1}", "\\boxed{1}"]
    values = score("length", texts, answer=["4", "4", "4", "4", "1", "1"],
                   prompt=["p", "p", "p", "p", "q", "q"], completion_lengths=[10, 30, 20, 12, 7, 7])
    # group p: min 10, max 30 -> lambda = 0.5 - (L - 10) / 20; wrong ones get min(0, lambda)
    assert values == pytest.approx([0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    assert values[3] == 0.0  # wrong but short: lambda = 0.4 is clipped to 0


def test_kimi_length_without_group_column_uses_one_group():
    values = score("length", ["\\boxed{4}", "\\boxed{4}"], answer=["4", "4"],
                   completion_lengths=[1, 3])
    assert values == [0.5, -0.5]


@pytest.mark.parametrize("completion, expected", [
    ("the cat sat on the mat", 0.0),
    ("a b c a b c", -0.25),  # 4 trigrams, 3 distinct
    ("spam " * 100, -(1 - 1 / 98)),
    ("too short", 0.0),
    ("", 0.0),
    ("Ünïcode wörds ünïcode WÖRDS ünïcode wörds", -0.5),  # 4 trigrams, 2 distinct
])
def test_repetition_penalty(completion, expected):
    assert score("repetition_penalty", [completion]) == [pytest.approx(expected)]


def test_repetition_penalty_scales_and_handles_long_text():
    assert score("repetition_penalty", ["a b c a b c"], p_max_penalty=-0.5) == [-0.125]
    assert score("repetition_penalty", ["a b a b"], p_ngram_size=1) == [-0.5]
    assert score("repetition_penalty", [LONG]) == [pytest.approx(-(1 - 1 / 49_998))]


def test_length_rewards_need_matching_lengths():
    reward = get_reward("soft_overlong_punishment")
    with pytest.raises(ValueError, match="completion_lengths"):
        reward(["a", "b"], completion_lengths=[1])
