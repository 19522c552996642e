"""8-gram decontamination: n-grams, hits, removal, and a check on the real data sets."""

import json

import pytest

from openr1_mega.data.decontaminate import build_index, decontaminate, find_hits, main, word_ngrams
from openr1_mega.eval.sources import read_rows
from openr1_mega.eval.tasks import default_data_dir, load_task

EVAL = {"bench": [
    {"id": "e1", "problem": "Let x be the number of ways to arrange the letters of the "
                            "word BANANA. Find x."},
    {"id": "e2", "problem": "Compute 2+2."},
]}


def test_word_ngrams():
    assert word_ngrams("A b  C\nd", 2) == {"a b", "b c", "c d"}
    assert word_ngrams("one two", 8) == {"one two"}           # shorter than n: whole text
    assert word_ngrams("   ", 8) == set()
    assert len(word_ngrams(" ".join(str(i) for i in range(20)), 8)) == 13
    with pytest.raises(ValueError, match="n must be >= 1"):
        word_ngrams("x", 0)


def test_hits_and_removal():
    train = [
        {"id": "t0", "problem": "Find the area of a circle of radius 3."},
        {"id": "t1", "problem": "LET X BE THE NUMBER OF WAYS TO ARRANGE the letters of the "
                                "word BANANA.   Find x."},                  # case/space copy
        {"id": "t2", "problem": "Count the number of ways to arrange the letters of the word "
                                "MISSISSIPPI."},                            # shares 8-grams
        {"id": "t3", "problem": "compute 2+2."},                            # short exact copy
        {"id": "t4", "problem": "Compute 2+3."},
    ]
    kept, report = decontaminate(train, EVAL)
    assert [r["id"] for r in kept] == ["t0", "t4"]
    assert report["removed"] == 3 and report["by_eval_set"] == {"bench": 3}
    by_id = {h["train_id"]: h for h in report["hits"]}
    assert by_id["t1"]["overlap"] == 1.0 and by_id["t1"]["eval_id"] == "e1"
    assert 0 < by_id["t2"]["overlap"] < 1 and by_id["t3"]["eval_id"] == "e2"
    strict = find_hits(train, build_index(EVAL), min_overlap=0.9)
    assert [h.train_id for h in strict] == ["t1", "t3"]


def test_field_errors_name_the_field():
    with pytest.raises(KeyError, match="has no field 'question'"):
        decontaminate([{"problem": "x"}], EVAL, field="question")
    with pytest.raises(ValueError, match="min_overlap"):
        decontaminate([{"problem": "x"}], EVAL, min_overlap=1.5)


def test_real_sets_and_cli(tmp_path):
    """The shipped AIME train set was already cleaned against MATH-500 (>= 0.6 overlap), so
    nothing is left at that level; a MATH-500 problem slipped in verbatim is caught."""
    aime = read_rows(default_data_dir() / "aime_1983_2023_train.jsonl")
    math500 = load_task("math500").rows
    assert find_hits(aime, build_index({"math500": math500}), min_overlap=0.6) == []
    planted = dict(math500[17], id="planted")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in aime[:30] + [planted]))
    report = main(["--train", str(train), "--eval", "math500,aime24", "--min-overlap", "0.6",
                   "--output", str(tmp_path / "clean.jsonl"),
                   "--report", str(tmp_path / "report.json")])
    assert [h["train_id"] for h in report["hits"]] == ["planted"]
    assert report["hits"][0]["eval_id"] == math500[17]["id"]
    assert len(read_rows(tmp_path / "clean.jsonl")) == 30
    assert json.loads((tmp_path / "report.json").read_text())["removed"] == 1
