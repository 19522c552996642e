"""Keep the teacher traces worth training on, and say why the others were dropped.

    python -m openr1_mega.distill filter --input <generate output dir> --output <dir>

A completion is kept when all of these hold (each is checked on every row, so the report
counts every reason a row fails, and the first reason as well):
  truncated       finish_reason != "length" (the teacher ended it itself);
  unclosed_think  `</think>` is present (the reasoning block was closed);
  unverifiable    the row has a gold answer that math-verify can parse;
  wrong_answer    math-verify accepts the final answer (text after `</think>`) against the
                  gold answer: eval/scoring.score_math, the accuracy reward's code path.
The kept rows are written as an HF dataset (parquet, same columns) with filter_report.json,
which also carries the problems `generate` skipped without sampling them (`skipped_problems`,
e.g. {"too_long": 3}: prompts that do not fit the teacher's context).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from openr1_mega.distill.shards import row_schema, write_parquet_atomic
from openr1_mega.eval.scoring import ScoringConfig, score_math
from openr1_mega.eval.sources import read_rows, write_atomic

REASONS = ("truncated", "unclosed_think", "unverifiable", "wrong_answer")


def failure_reasons(rows: Sequence[dict[str, Any]],
                    config: ScoringConfig | None = None) -> list[list[str]]:
    """For each row, the reasons (in REASONS order) it fails; an empty list means keep."""
    scores = score_math([r["completion"] for r in rows], [r.get("answer") for r in rows],
                        config or ScoringConfig()).scores
    out = []
    for row, score in zip(rows, scores):
        failed = []
        if row.get("finish_reason") == "length":
            failed.append("truncated")
        if "</think>" not in row["completion"]:
            failed.append("unclosed_think")
        if score is None:
            failed.append("unverifiable")
        elif score < 1.0:
            failed.append("wrong_answer")
        out.append(failed)
    return out


def report(rows: Sequence[dict[str, Any]], reasons: Sequence[list[str]]) -> dict[str, Any]:
    """kept/total overall and per problem, with counts of every reason and of the first one."""
    kept = [r for r, why in zip(rows, reasons) if not why]
    problems = {r["problem_id"] for r in rows}
    every = Counter(reason for why in reasons for reason in why)
    first = Counter(why[0] for why in reasons if why)
    return {"total": len(rows), "kept": len(kept),
            "kept_fraction": len(kept) / len(rows) if rows else 0.0,
            "failed": {reason: every[reason] for reason in REASONS},
            "first_failure": {reason: first[reason] for reason in REASONS},
            "problems": len(problems),
            "problems_with_a_kept_trace": len({r["problem_id"] for r in kept})}


def filter_traces(input_path: str | Path, output_dir: str | Path,
                  config: ScoringConfig | None = None) -> dict[str, Any]:
    """Filter a generated dataset into `output_dir` (data/*.parquet + filter_report.json).

    Args:
        input_path: a `generate` output directory (its data/ folder is read) or a
            parquet/jsonl file or folder of rows with the generate columns.
        output_dir: where the kept rows and the report go.
        config: verification workers and time limit (default ScoringConfig()).
    """
    source, skipped = Path(input_path), {}
    if (source / "data").is_dir():
        skipped = _skipped_by_generate(source)
        source = source / "data"
    rows = read_rows(source)
    missing = {"problem_id", "completion", "finish_reason", "answer"} - set(rows[0] if rows
                                                                            else {})
    if missing:
        raise ValueError(f"{input_path}: rows lack field(s) {sorted(missing)}")
    reasons = failure_reasons(rows, config)
    kept = [r for r, why in zip(rows, reasons) if not why]
    out = Path(output_dir)
    write_parquet_atomic(out / "data" / "train-00000-of-00001.parquet", kept, row_schema())
    summary = dict(report(rows, reasons), input=str(input_path), skipped_problems=skipped)
    write_atomic(out / "filter_report.json", json.dumps(summary, indent=2))
    return summary


def _skipped_by_generate(run_dir: Path) -> dict[str, int]:
    """{reason: problems} that `generate` skipped (e.g. too_long), from its manifest."""
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        return {}
    return dict(json.loads(manifest.read_text()).get("skipped_problems", {}))
