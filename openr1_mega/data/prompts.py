"""Prompt sources: built-in tasks, JSONL files, and HF datasets (local or by hub name).

Every row is checked before use: each required text field (problem, answer) must be
present, non-empty and a string or a number; each conversation field (SFT `messages`) a
non-empty list of {role, content} strings; a JSONL line must be UTF-8, valid JSON, an
object, and at most MAX_ROW_BYTES long. What happens to a row that fails is the recipe's
`on_bad_row`:
  skip   (default) the row is dropped; once per file a warning gives the count and the
         first few row numbers (JSONL: 1-based line numbers; datasets: 0-based row index);
  error  the first bad row raises ValueError naming the file, the row and the field.
Prompts are tokenised once with the chat template (data/chat.py); over-long ones are
skipped and counted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openr1_mega.data.chat import encode_prompt
from openr1_mega.data.tasks import task_rows

logger = logging.getLogger(__name__)

ON_BAD_ROW = ("skip", "error")
MAX_ROW_BYTES = 4 << 20
"""Longest accepted row (JSONL line, or the summed length of a row's checked fields)."""
SHOWN_BAD_ROWS = 5
"""How many bad row numbers the once-per-file warning lists."""


class BadRowError(ValueError):
    """A row that fails its checks under `on_bad_row: error` (names file, row and field)."""


@dataclass
class BadRows:
    """The rows of one source that were dropped: how many, and the first few with why."""

    source: str
    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, where: str, problem: str) -> None:
        self.count += 1
        if len(self.first) < SHOWN_BAD_ROWS:
            self.first.append(f"{where} ({problem})")

    def log(self, total: int) -> None:
        """One warning for the whole source (nothing when every row was good)."""
        if self.count:
            logger.warning("%s: skipped %d bad row(s) of %d; first: %s", self.source,
                           self.count, total, "; ".join(self.first))


def load_rows(source: str, split: str = "train", n: int | None = None, seed: int = 0,
              required: tuple[str, ...] = ("problem", "answer"),
              conversation_fields: tuple[str, ...] = (), on_bad_row: str = "skip"
              ) -> list[dict]:
    """The first `n` good rows of `task:<name>`, a .jsonl file, an HF dataset dir, or a hub name.

    Args:
        required: text fields every row needs (a non-empty string or a number).
        conversation_fields: fields holding a chat conversation (list of {role, content}).
        on_bad_row: "skip" (count, log once, drop) or "error" (raise BadRowError).
    """
    rows, bad = read_checked_rows(source, split, n, seed, required, conversation_fields,
                                  on_bad_row)
    bad.log(len(rows) + bad.count)
    return rows


def read_checked_rows(source: str, split: str = "train", n: int | None = None, seed: int = 0,
                      required: tuple[str, ...] = ("problem", "answer"),
                      conversation_fields: tuple[str, ...] = (), on_bad_row: str = "skip"
                      ) -> tuple[list[dict], BadRows]:
    """`load_rows` without the warning: (good rows, the bad rows' count and first numbers)."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row={on_bad_row!r}: expected one of {ON_BAD_ROW}")
    bad, rows = BadRows(source), []
    for where, row, problem in _raw_rows(source, split, n, seed):
        problem = problem or row_problem(row, required, conversation_fields)
        if problem is None:
            rows.append(row)
        elif on_bad_row == "error":
            raise BadRowError(f"{source} {where}: {problem}")
        else:
            bad.add(where, problem)
        if n is not None and len(rows) >= n:
            break
    return rows, bad


def row_problem(row: dict, required: tuple[str, ...] = (),
                conversation_fields: tuple[str, ...] = ()) -> str | None:
    """What is wrong with `row` ("field 'answer': empty"), or None when it is good."""
    size = 0
    for name in required:
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            return f"field {name!r}: missing or empty"
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return f"field {name!r}: expected a string or number, got {type(value).__name__}"
        size += len(value) if isinstance(value, str) else 0
    for name in conversation_fields:
        problem, length = _conversation_problem(row.get(name))
        if problem is not None:
            return f"field {name!r}: {problem}"
        size += length
    if size > MAX_ROW_BYTES:
        return f"{size} characters, over the {MAX_ROW_BYTES}-byte row limit"
    return None


def _conversation_problem(messages: Any) -> tuple[str | None, int]:
    """(what is wrong with a conversation or None, its text length)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        return "expected a non-empty list of messages", 0
    length = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            return f"message {i} must be a mapping with string 'role' and 'content'", 0
        length += len(message["content"])
    return None, length


def tokenize_prompts(rows: list[dict], tokenizer, problem_field: str, system_prompt: str | None,
                     max_tokens: int) -> tuple[list[dict], int]:
    """Add `prompt_ids` to each row; returns (rows that fit, number skipped as too long)."""
    kept = []
    for row in rows:
        ids = encode_prompt(tokenizer, str(row[problem_field]), system_prompt)
        if len(ids) <= max_tokens:
            kept.append({**row, "prompt_ids": ids})
    return kept, len(rows) - len(kept)


def _raw_rows(source: str, split: str, n: int | None, seed: int
              ) -> Iterator[tuple[str, dict, str | None]]:
    """(where, row, problem found while reading or None) for every row of the source."""
    if source.startswith("task:"):
        rows = task_rows(source.removeprefix("task:"), split, n or 1000, seed=seed)
        return ((f"row {i}", row, None) for i, row in enumerate(rows))
    if source.endswith(".jsonl"):
        return _jsonl_rows(Path(source))
    return ((f"row {i}", row, None) for i, row in enumerate(_read_hf_dataset(source, split)))


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict, str | None]]:
    """Rows of a JSONL file, read as bytes so a bad line cannot stop the ones after it."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            row, problem = parse_jsonl_line(raw)
            yield f"line {number}", row, problem


def parse_jsonl_line(raw: bytes) -> tuple[dict, str | None]:
    """(row, None), or ({}, what is wrong: too long, not UTF-8, not JSON, not an object)."""
    if len(raw) > MAX_ROW_BYTES:
        return {}, f"{len(raw)} bytes, over the {MAX_ROW_BYTES}-byte row limit"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return {}, f"not UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return {}, f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(row, dict):
        return {}, f"expected a JSON object, got {type(row).__name__}"
    return row, None


def _read_hf_dataset(source: str, split: str) -> list[dict]:
    import datasets

    if Path(source).is_dir():
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
    else:
        data = datasets.load_dataset(source, split=split)
    return [dict(r) for r in data]
