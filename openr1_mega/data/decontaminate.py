"""Decontamination: drop training problems that share word 8-grams with evaluation problems.

    python -m openr1_mega.data.decontaminate --train data/train.jsonl \\
        --eval math500,aime24,aime25,amc23,gsm8k --output clean.jsonl --report report.json

Algorithm (open-r1's scripts/decontaminate.py, plus an overlap threshold):
  1. normalise a problem: lowercase, whitespace runs -> one space;
  2. its n-grams are the runs of n consecutive words; a text shorter than n words is one
     n-gram of all its words (so a short problem copied verbatim is still caught);
  3. index every n-gram of every evaluation problem -> the (set, id) holding it;
  4. a training problem is a hit when it shares at least one n-gram with an evaluation
     problem and overlap = shared n-grams / its n-grams >= min_overlap (default 0: any
     shared 8-gram, as open-r1); the evaluation problem sharing the most is reported.
Hits are removed; the report lists each with its best match, per evaluation set.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_N = 8


def normalize(text: str) -> str:
    """Lowercase and collapse whitespace."""
    return " ".join(text.lower().split())


def word_ngrams(text: str, n: int = DEFAULT_N) -> set[str]:
    """The set of word n-grams of the normalised text (the whole text if shorter than n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = normalize(text).split()
    if not words:
        return set()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class Hit:
    """A training problem that overlaps an evaluation problem."""

    train_index: int
    train_id: str
    eval_set: str
    eval_id: str
    shared_ngrams: int
    overlap: float
    """shared n-grams / n-grams of the training problem."""


NgramIndex = dict[str, list[tuple[str, str]]]


def build_index(eval_sets: Mapping[str, Sequence[dict[str, Any]]], n: int = DEFAULT_N,
                field: str = "problem") -> NgramIndex:
    """n-gram -> [(set name, problem id)] over every evaluation problem."""
    index: NgramIndex = defaultdict(list)
    for name, rows in eval_sets.items():
        for i, row in enumerate(rows):
            for gram in word_ngrams(_text(row, field, name, i), n):
                index[gram].append((name, str(row.get("id", i))))
    return index


def _text(row: dict[str, Any], field: str, where: str, i: int) -> str:
    if field not in row:
        raise KeyError(f"{where}: row {i} has no field {field!r}; fields are {sorted(row)}")
    return str(row[field])


def find_hits(train_rows: Sequence[dict[str, Any]], index: NgramIndex, n: int = DEFAULT_N,
              field: str = "problem", min_overlap: float = 0.0) -> list[Hit]:
    """The training rows that overlap the indexed evaluation problems, in input order."""
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
    hits = []
    for i, row in enumerate(train_rows):
        grams = word_ngrams(_text(row, field, "train", i), n)
        shared = Counter(owner for gram in grams for owner in set(index.get(gram, ())))
        if not shared:
            continue
        (eval_set, eval_id), count = max(shared.items(), key=lambda kv: kv[1])
        overlap = count / len(grams)
        if overlap >= min_overlap:
            hits.append(Hit(i, str(row.get("id", i)), eval_set, eval_id, count, overlap))
    return hits


def decontaminate(train_rows: Sequence[dict[str, Any]],
                  eval_sets: Mapping[str, Sequence[dict[str, Any]]], *, n: int = DEFAULT_N,
                  field: str = "problem", eval_field: str = "problem",
                  min_overlap: float = 0.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Remove training rows that overlap the evaluation sets.

    Returns:
        (kept rows in input order, report {ngram, min_overlap, train_rows, removed,
        by_eval_set, hits[]}).
    """
    hits = find_hits(train_rows, build_index(eval_sets, n, eval_field), n, field, min_overlap)
    removed = {h.train_index for h in hits}
    kept = [row for i, row in enumerate(train_rows) if i not in removed]
    report = {"ngram": n, "min_overlap": min_overlap, "train_rows": len(train_rows),
              "removed": len(removed),
              "eval_sets": {name: len(rows) for name, rows in eval_sets.items()},
              "by_eval_set": dict(Counter(h.eval_set for h in hits)),
              "hits": [asdict(h) for h in hits]}
    return kept, report


def _load_eval_sets(spec: str) -> dict[str, list[dict[str, Any]]]:
    """Comma-separated task names (eval registry) or NAME=PATH pairs."""
    from openr1_mega.eval.sources import read_rows
    from openr1_mega.eval.tasks import load_task

    out = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, sep, path = item.partition("=")
        out[name] = read_rows(path) if sep else load_task(name).rows
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from openr1_mega.eval.sources import read_rows, write_atomic, write_jsonl

    p = argparse.ArgumentParser(prog="python -m openr1_mega.data.decontaminate",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="training rows: jsonl/json/parquet or hub")
    p.add_argument("--train-field", default="problem")
    p.add_argument("--eval", default="math500,aime24,aime25,amc23,gsm8k",
                   help="eval task names or NAME=PATH, comma-separated")
    p.add_argument("--ngram", type=int, default=DEFAULT_N)
    p.add_argument("--min-overlap", type=float, default=0.0)
    p.add_argument("--output", type=Path, help="decontaminated rows (jsonl)")
    p.add_argument("--report", type=Path, help="report JSON")
    args = p.parse_args(argv)
    kept, report = decontaminate(read_rows(args.train), _load_eval_sets(args.eval),
                                 n=args.ngram, field=args.train_field,
                                 min_overlap=args.min_overlap)
    if args.output is not None:
        write_jsonl(args.output, kept)
    if args.report is not None:
        write_atomic(args.report, json.dumps(report, indent=2, ensure_ascii=False))
    print(json.dumps({k: report[k] for k in ("train_rows", "removed", "by_eval_set")}))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
