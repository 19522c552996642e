"""Trace filtering: every rejection reason is detected and counted, kept rows are written.

Rows are hand-made so each reason is known in advance; verification is real math-verify.
"""

import json

import pytest

from openr1_mega.distill.filter import failure_reasons, filter_traces
from openr1_mega.distill.shards import ShardStore
from openr1_mega.eval.scoring import ScoringConfig
from openr1_mega.eval.sources import read_rows

CASES = [  # (completion, finish_reason, gold, expected failure reasons)
    ("<think>2+2=4</think>The answer is \\boxed{4}.", "stop", "4", []),
    ("<think>half</think>So $\\boxed{\\frac{1}{2}}$", "stop", "0.5", []),
    ("<think>2+2=5</think>\\boxed{5}", "stop", "4", ["wrong_answer"]),
    ("<think>\\boxed{4} I think</think>Final: \\boxed{3}", "stop", "4", ["wrong_answer"]),
    ("<think>2+2 is \\boxed{4} and still going", "length", "4", ["truncated", "unclosed_think"]),
    ("\\boxed{4}", "stop", "4", ["unclosed_think"]),
    ("<think>x</think>\\boxed{4}", "length", "4", ["truncated"]),
    ("<think>x</think>\\boxed{4}", "stop", None, ["unverifiable"]),
]


def _rows():
    return [{"problem_id": f"p{i // 2}", "sample_index": i % 2, "problem": "What is 2+2?",
             "answer": gold, "messages": [{"role": "user", "content": "What is 2+2?"},
                                          {"role": "assistant", "content": completion}],
             "completion": completion, "finish_reason": finish, "prompt_tokens": 5,
             "completion_tokens": 9} for i, (completion, finish, gold, _) in enumerate(CASES)]


def test_failure_reasons():
    reasons = failure_reasons(_rows(), ScoringConfig(workers=0))
    assert reasons == [expected for *_, expected in CASES]


def test_filter_writes_kept_rows_and_report(tmp_path):
    store = ShardStore(tmp_path / "traces", 2, {"teacher": "hand-written"})
    rows = _rows()
    store.write(0, rows[:4])
    store.write(1, rows[4:])
    summary = filter_traces(tmp_path / "traces", tmp_path / "kept", ScoringConfig(workers=2))
    assert summary["total"] == 8 and summary["kept"] == 2
    assert summary["failed"] == {"truncated": 2, "unclosed_think": 2, "unverifiable": 1,
                                 "wrong_answer": 2}
    assert summary["first_failure"] == {"truncated": 2, "unclosed_think": 1,
                                        "unverifiable": 1, "wrong_answer": 2}
    assert sum(summary["first_failure"].values()) == summary["total"] - summary["kept"]
    assert summary["problems"] == 4 and summary["problems_with_a_kept_trace"] == 1
    kept = read_rows(tmp_path / "kept" / "data")
    assert [r["completion"] for r in kept] == [CASES[0][0], CASES[1][0]]
    assert kept[0]["messages"][-1]["content"] == CASES[0][0]
    report = json.loads((tmp_path / "kept" / "filter_report.json").read_text())
    assert report["kept"] == 2


def test_filter_names_missing_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem_id": "a", "completion": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"lack field\(s\) \['answer', 'finish_reason'\]"):
        filter_traces(path, tmp_path / "out")
