"""Prompt sources: built-in tasks, JSONL files, and HF datasets (local or by hub name).

Every source yields rows with at least the problem and answer fields the recipe names;
a row missing them is an error naming the row, never silently dropped. Prompts are
tokenised once with the chat template (data/chat.py); over-long ones are skipped and
counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from openr1_mega.data.chat import encode_prompt
from openr1_mega.data.tasks import task_rows


def load_rows(source: str, split: str = "train", n: int | None = None, seed: int = 0,
              required: tuple[str, ...] = ("problem", "answer")) -> list[dict]:
    """Rows from `task:<name>`, a .jsonl file, a saved HF dataset dir, or a hub dataset name."""
    if source.startswith("task:"):
        rows = task_rows(source.removeprefix("task:"), split, n or 1000, seed=seed)
    elif source.endswith(".jsonl"):
        rows = _read_jsonl(Path(source))
    else:
        rows = _read_hf_dataset(source, split)
    rows = rows[:n] if n is not None else rows
    for i, row in enumerate(rows):
        missing = [k for k in required if k not in row or row[k] in (None, "")]
        if missing:
            raise ValueError(f"{source} row {i} (id={row.get('id')!r}) lacks field(s) {missing}")
    return rows


def tokenize_prompts(rows: list[dict], tokenizer, problem_field: str, system_prompt: str | None,
                     max_tokens: int) -> tuple[list[dict], int]:
    """Add `prompt_ids` to each row; returns (rows that fit, number skipped as too long)."""
    kept = []
    for row in rows:
        ids = encode_prompt(tokenizer, str(row[problem_field]), system_prompt)
        if len(ids) <= max_tokens:
            kept.append({**row, "prompt_ids": ids})
    return kept, len(rows) - len(kept)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
    return rows


def _read_hf_dataset(source: str, split: str) -> list[dict]:
    import datasets

    if Path(source).is_dir():
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
    else:
        data = datasets.load_dataset(source, split=split)
    return [dict(r) for r in data]
