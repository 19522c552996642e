"""Task loading, prompts and scoring without an engine: real data, real math-verify.

The oracle check scores MATH-500's gold solutions through the eval scorer, which must
accept at least 99% of them, and must agree exactly with the GRPO accuracy reward.
"""

import base64
import hashlib
import json
import os
import pickle
import zlib
from collections import Counter
from pathlib import Path

import pytest

from openr1_mega.eval import lcb_data, scoring, tasks
from openr1_mega.eval.sources import sha256_rows
from openr1_mega.eval.tasks import load_task
from openr1_mega.rl.rewards import get_reward


def test_math500_oracle_gold_solutions():
    task = load_task("math500")
    assert len(task.rows) == 500
    solutions = [row["solution"] for row in task.rows]
    scored = scoring.score("math", solutions, task.rows, scoring.ScoringConfig(workers=2))
    accepted = sum(s == 1.0 for s in scored.scores) / len(solutions)
    assert accepted >= 0.99, f"oracle accuracy {accepted:.3f}"
    reward = get_reward("accuracy")
    head = task.rows[:60]
    assert scored.scores[:60] == reward(solutions[:60], answer=[r["answer"] for r in head])


def test_local_task_provenance():
    task = load_task("math500", limit=20)
    data = task.describe()
    assert data["rows"] == 20 and data["total_rows"] == 500
    digest = hashlib.sha256(Path(data["source"]).read_bytes()).hexdigest()
    assert data["source_sha256"] == digest
    assert data["rows_sha256"] == sha256_rows(task.rows)
    assert [r["id"] for r in task.rows] == [r["id"] for r in load_task("math500").rows[:20]]
    for name, count in [("aime24", 30), ("aime25", 30), ("gsm8k", 1319), ("amc23", 40)]:
        assert len(load_task(name).rows) == count


def test_task_errors_name_the_problem(tmp_path):
    with pytest.raises(KeyError, match="registered tasks are"):
        load_task("math5000")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "problem": "1+1"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 lacks field\(s\) \['answer'\]"):
        load_task("math500", source=str(bad))
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"id": "a", "problem": "p", "answer": "1"}) + "\n"
                           for _ in range(2)))
    with pytest.raises(ValueError, match="duplicate problem id 'a'"):
        load_task("math500", source=str(dup))
    with pytest.raises(FileNotFoundError, match="prefer=local"):
        load_task("gpqa_diamond", data_dir=tmp_path, prefer="local")


def test_math_prompt_and_vote_key():
    row = {"id": "1", "problem": "What is $1+1$?", "answer": "2"}
    assert tasks.user_prompt("math", row) == ("What is $1+1$?\nPlease reason step by step, "
                                              "and put your final answer within \\boxed{}.")
    msgs = tasks.messages("math", row, system_prompt="Be brief.")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert scoring.last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert scoring.last_boxed("\\boxed{unclosed") is None
    assert scoring.math_vote_key("<think>\\boxed{9}</think> so \\boxed{\\dfrac{1}{ 2}}.") == \
        "\\frac{1}{2}"
    assert scoring.final_part("<think>x</think>y") == "y"
    assert scoring.final_part("no think") == "no think"


def test_math_scores_only_the_final_part():
    rows = [{"answer": "7"}] * 3
    completions = ["<think>maybe \\boxed{7}</think>The answer is \\boxed{8}.",
                   "<think>maybe \\boxed{8}</think>The answer is \\boxed{7}.",
                   "The answer is \\boxed{7}."]
    scored = scoring.score("math", completions, rows, scoring.ScoringConfig(workers=0))
    assert scored.scores == [0.0, 1.0, 1.0]
    assert scored.answers == ["8", "7", "7"]


@pytest.mark.parametrize("text,letter", [
    ("Reasoning...\nAnswer: C", "C"),
    ("<think>Answer: A</think>\nAnswer: (B)", "B"),
    ("so the answer is $\\boxed{D}$", "D"),
    ("The answer is (a).", "A"),
    ("I pick\nB", "B"),
    ("I cannot decide.", None),
])
def test_extract_letter(text, letter):
    assert scoring.extract_letter(text) == letter


def _gpqa_rows(count):
    return [{"id": f"q{i}", "problem": f"Which value is right for question {i}?",
             "correct_answer": f"right {i}",
             "incorrect_answers": [f"wrong {i}.{j}" for j in range(3)]} for i in range(count)]


def test_gpqa_choices_are_placed_with_a_fixed_seed(tmp_path):
    path = tmp_path / "gpqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _gpqa_rows(40)))
    task = load_task("gpqa_diamond", source=str(path))
    again = load_task("gpqa_diamond", source=str(path))
    sliced = load_task("gpqa_diamond", source=str(path), limit=5)
    other = load_task("gpqa_diamond", source=str(path), choice_seed=7)
    letters = [r["gold_letter"] for r in task.rows]
    assert letters == [r["gold_letter"] for r in again.rows]
    assert letters[:5] == [r["gold_letter"] for r in sliced.rows]
    assert letters != [r["gold_letter"] for r in other.rows]
    assert len(Counter(letters)) == 4                      # every position gets used
    for row in task.rows:
        assert row["choices"]["ABCD".index(row["gold_letter"])] == row["correct_answer"]
        assert sorted(row["choices"]) == sorted([row["correct_answer"], *row["incorrect_answers"]])
        prompt = tasks.user_prompt("choice", row)
        assert f"{row['gold_letter']}) {row['correct_answer']}" in prompt
        assert prompt.startswith("Answer the following multiple choice question.")
    right = [f"Thinking.\nAnswer: {r['gold_letter']}" for r in task.rows]
    wrong = [f"Answer: {'B' if r['gold_letter'] == 'A' else 'A'}" for r in task.rows]
    assert scoring.score("choice", right, task.rows).scores == [1.0] * 40
    assert scoring.score("choice", wrong, task.rows).scores == [0.0] * 40


def test_lcb_prompt_and_test_decoding():
    stdin = lcb_data.prompt("Add two numbers.")
    assert "Question: Add two numbers." in stdin and "# YOUR CODE HERE" in stdin
    func = lcb_data.prompt("Add.", "class Solution:\n    def add(self, a, b):")
    assert "starter code" in func and "def add(self, a, b)" in func
    tests = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]
    encoded = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()
    assert lcb_data.decode_private_tests(encoded) == tests
    hostile = base64.b64encode(zlib.compress(pickle.dumps(os.getcwd))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        lcb_data.decode_private_tests(hostile)
    row = lcb_data.from_hub({"question_id": "abc1", "question_content": "Add.",
                             "starter_code": "", "public_test_cases": json.dumps(tests),
                             "private_test_cases": encoded,
                             "metadata": json.dumps({"func_name": None})}, 0)
    assert row["id"] == "abc1" and row["test_cases"] == tests + tests
    assert row["starter_code"] is None
    code = "<think>```python\nprint(0)\n```</think>Here:\n```python\nprint(1)\n```\nand\n" \
           "```py\nprint(2)\n```"
    assert lcb_data.extract_code(code) == "print(2)\n"
    assert lcb_data.extract_code("no code") is None


def _code_rows():
    stdin = {"id": "sum", "problem": "Read two integers and print their sum.",
             "test_cases": [{"input": "1 2\n", "output": "3\n"},
                            {"input": "10 -4\n", "output": "6\n"}]}
    functional = {"id": "twice", "problem": "Return the list doubled.",
                  "starter_code": "class Solution:\n    def double(self, nums, k):",
                  "fn_name": "double",
                  "test_cases": json.dumps([{"input": "[1, 2]\n3", "output": "[3,6]"},
                                            {"input": "[]\n1", "output": "[]"}])}
    return [stdin, functional]


def test_code_task_runs_tests_in_the_rewards_sandbox(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _code_rows()))
    task = load_task("livecodebench", source=str(path))
    assert "def double(self, nums, k)" in tasks.user_prompt("code", task.rows[1])
    good_sum = "<think>easy</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    bad_sum = "```python\nprint(3)\n```"                  # passes the first test only
    good_fn = ("```python\nclass Solution:\n    def double(self, nums, k):\n"
               "        return [k * x for x in nums]\n```")
    bad_fn = ("```python\nclass Solution:\n    def double(self, nums, k):\n"
              "        return nums\n```")
    rows = [task.rows[0], task.rows[0], task.rows[0], task.rows[1], task.rows[1]]
    completions = [good_sum, bad_sum, "no code at all", good_fn, bad_fn]
    scored = scoring.score("code", completions, rows, scoring.ScoringConfig(code_timeout=5.0))
    assert scored.scores == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert scored.counts["no_code"] == 1


def test_cli_scores_choice_and_code_completions(tmp_path, capsys):
    from openr1_mega.eval.__main__ import main

    gpqa, code = tmp_path / "gpqa.jsonl", tmp_path / "code.jsonl"
    gpqa.write_text("".join(json.dumps(r) + "\n" for r in _gpqa_rows(4)))
    code.write_text("".join(json.dumps(r) + "\n" for r in _code_rows()))
    letters = [r["gold_letter"] for r in load_task("gpqa_diamond", source=str(gpqa)).rows]
    rows = [{"task": "gpqa_diamond", "id": f"q{i}", "completion": f"Answer: {letter}"}
            for i, letter in enumerate(letters)]
    rows += [{"task": "gpqa_diamond", "id": "q0", "completion": "Answer: "
              + ("A" if letters[0] != "A" else "B")},
             {"task": "livecodebench", "id": "sum",
              "completion": "```python\nprint(sum(map(int, input().split())))\n```"}]
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = main(["--tasks", "gpqa_diamond,livecodebench", "--dataset", f"gpqa_diamond={gpqa}",
                   "--dataset", f"livecodebench={code}", "--completions", str(path)])
    choice = report["tasks"]["gpqa_diamond"]
    assert choice["metrics"]["pass@1"] == pytest.approx((0.5 + 3) / 4)
    assert choice["problems"][0]["answers"][0] == letters[0]
    coding = report["tasks"]["livecodebench"]["metrics"]
    assert coding["pass@1"] == 1.0 and coding["problems"] == 1 and coding["missing"] == 1
    table = capsys.readouterr().out
    assert "gpqa_diamond" in table and "livecodebench" in table


def test_hub_rows_map_to_the_task_schema():
    gsm = tasks.TASKS["gsm8k"].from_hub(
        {"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 1,004"}, 7)
    assert gsm == {"id": "gsm8k-test-7", "problem": "How many?", "answer": "1004",
                   "solution": "2 + 2 = <<2+2=4>>4\n#### 1,004"}
    gpqa = tasks.TASKS["gpqa_diamond"].from_hub(
        {"Record ID": "rec1", "Question": "Q?", "Correct Answer": "yes",
         "Incorrect Answer 1": "n1", "Incorrect Answer 2": "n2", "Incorrect Answer 3": "n3"}, 0)
    assert gpqa == {"id": "rec1", "problem": "Q?", "correct_answer": "yes",
                    "incorrect_answers": ["n1", "n2", "n3"]}
    math = tasks.TASKS["math500"].from_hub(
        {"unique_id": "test/x/1.json", "problem": "P", "answer": "3", "solution": "S"}, 0)
    assert math == {"id": "test/x/1.json", "problem": "P", "answer": "3", "solution": "S"}
