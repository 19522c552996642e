"""Chat encoding, packing and the built-in arithmetic task."""

import pytest
import torch
from transformers import AutoTokenizer

from openr1_mega.data.chat import Example, encode_conversation, encode_prompt
from openr1_mega.data.packing import document_causal_mask, pack_examples, pad_examples
from openr1_mega.data.tasks import task_rows
from openr1_mega.data.tasks.arithmetic import solve_addition
from openr1_mega.data.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_assistant_only_mask(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2=?"},
                {"role": "assistant", "content": "<answer>3</answer>"}]
    ex = encode_conversation(tokenizer, messages)
    trained = tokenizer.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert trained.startswith("<answer>3</answer><|im_end|>")
    prompt = encode_prompt(tokenizer, "1+2=?", "Be brief.")
    assert ex.input_ids[:len(prompt)] == prompt and not any(ex.loss_mask[:len(prompt)])


@pytest.mark.parametrize("messages, error", [
    ([], "empty"),
    ([{"role": "user", "content": "hi"}], "no assistant"),
    ([{"role": "robot", "content": "hi"}], "role"),
])
def test_bad_conversations_name_the_problem(tokenizer, messages, error):
    with pytest.raises(ValueError, match=error):
        encode_conversation(tokenizer, messages)


def _examples(lengths):
    return [Example(list(range(1, n + 1)), [0] + [1] * (n - 1)) for n in lengths]


def test_packing_keeps_every_token_once():
    examples = _examples([5, 9, 3, 7, 2, 8])
    rows = pack_examples(examples, max_tokens=12)
    assert all(len(r.input_ids) == 12 for r in rows)
    assert sum(r.num_tokens for r in rows) == sum(sum(e.loss_mask[1:]) for e in examples)
    assert sorted(int(n) for r in rows for n in r.cu_seqlens.diff() if n) \
        == sorted([5, 9, 3, 7, 2, 8] + [12 * len(rows) - 34])
    for r in rows:  # positions restart at each document boundary
        starts = r.cu_seqlens[:-1].long()
        assert torch.all(r.position_ids[starts] == 0)


def test_packing_rejects_overlong_example():
    with pytest.raises(ValueError, match="example 1 has 20 tokens"):
        pack_examples(_examples([3, 20]), max_tokens=10)


def test_document_mask_is_block_diagonal_causal():
    mask = document_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)
    allowed = ~mask
    assert allowed[1, 0] and not allowed[0, 1]  # causal inside doc 0
    assert not allowed[2, 1] and allowed[4, 2]  # doc 1 cannot see doc 0
    assert allowed.sum() == 3 + 6


def test_padded_batch_labels_are_shifted():
    batch = pad_examples(_examples([3, 5]))
    assert batch.input_ids.shape == (2, 5)
    assert batch.labels[0, :2].tolist() == [2, 3] and batch.loss_mask[0].tolist() == [1, 1, 0, 0, 0]


def test_arithmetic_task_is_correct_and_split():
    train = task_rows("arithmetic", "train", 200, seed=3)
    test = task_rows("arithmetic", "test", 50, seed=3)
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    for row in train:
        a, b = map(int, row["problem"].rstrip("=?").split("+"))
        assert row["answer"] == str(a + b)
        assert row["solution"].endswith(f"<answer>{a + b}</answer>")
    assert task_rows("arithmetic", "train", 20, seed=3) == train[:20]
    assert solve_addition(95, 7) == "<think>5+7+0=12 9+0+1=10 carry 1</think><answer>102</answer>"


def test_task_errors_name_the_argument():
    with pytest.raises(ValueError, match="unknown task"):
        task_rows("countdown", "train", 1)
    with pytest.raises(ValueError, match="split"):
        task_rows("arithmetic", "dev", 1)
    with pytest.raises(ValueError, match="exceeds"):
        task_rows("arithmetic", "test", 10**6, digits=1)
