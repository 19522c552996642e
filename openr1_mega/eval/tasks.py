"""Benchmark task registry: where each set's rows come from, and the prompt they get.

A task has a kind that decides prompt and scoring (eval/scoring.py):
  math    rows {id, problem, answer}: the problem followed by the open-r1/lighteval
          instruction "Please reason step by step, and put your final answer within
          \\boxed{}."; scored by math-verify.
  choice  rows {id, problem, correct_answer, incorrect_answers[3]} (GPQA): the four choices
          are placed as lighteval's `gpqa_instruct` does (gold position drawn with
          random.randint(0, 3), here from one Random(choice_seed) in dataset order, before
          --limit, so a slice keeps the full run's order) and the simple-evals prompt asks
          for "Answer: $LETTER".
  code    rows {id, problem, test_cases[{input, output}], fn_name?, starter_code?}
          (LiveCodeBench): the LCB code-generation prompt; scored by the rewards sandbox.
Rows are read from a local file (by default `<data dir>/<file>`, the data dir being
$OPENR1_DATA_DIR or the repository's own `data/` folder, see data/README.md), or from
the hub by name when no local file exists (or `prefer="hub"`). Hub rows are mapped to the
schema above by the task's `from_hub` function.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openr1_mega.eval import lcb_data
from openr1_mega.eval.sources import read_rows, sha256_rows, sha256_source

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
GPQA_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should "
    "be of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of "
    "ABCD. Think step by step before answering.\n\n{question}\n\nA) {a}\nB) {b}\nC) {c}\nD) {d}"
)
LETTERS = "ABCD"
KINDS = ("math", "choice", "code")
DEFAULT_CHOICE_SEED = 1234


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub."""

    name: str
    config: str | None = None
    split: str = "test"


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark: its kind, local file name, hub source and hub-row mapping."""

    name: str
    kind: str
    local_file: str | None = None
    hub: HubSource | None = None
    from_hub: Callable[[dict[str, Any], int], dict[str, Any]] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind must be one of {KINDS}, got {self.kind!r}")


@dataclass
class TaskData:
    """A loaded task: its rows (after --limit) and where exactly they came from."""

    spec: TaskSpec
    rows: list[dict[str, Any]]
    source: str
    source_sha256: str | None
    total_rows: int
    rows_sha256: str = field(init=False)

    def __post_init__(self):
        self.rows_sha256 = sha256_rows(self.rows)

    @property
    def name(self) -> str:
        return self.spec.name

    def describe(self) -> dict[str, Any]:
        """The provenance recorded in results: source, hashes and row counts."""
        return {"source": self.source, "source_sha256": self.source_sha256,
                "rows_sha256": self.rows_sha256, "rows": len(self.rows),
                "total_rows": self.total_rows}


def _math_hub(problem: str, answer: str, id_field: str) -> Callable[[dict, int], dict]:
    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        return {"id": str(row.get(id_field, index)), "problem": row[problem],
                "answer": str(row[answer]), "solution": row.get("solution")}
    return convert


def _gsm8k_hub(row: dict[str, Any], index: int) -> dict[str, Any]:
    """openai/gsm8k keeps the worked solution with the answer after '####' (commas removed)."""
    answer = row["answer"].split("####")[-1].strip().replace(",", "")
    return {"id": f"gsm8k-test-{index}", "problem": row["question"], "answer": answer,
            "solution": row["answer"]}


def _gpqa_hub(row: dict[str, Any], index: int) -> dict[str, Any]:
    return {"id": row.get("Record ID", str(index)), "problem": row["Question"],
            "correct_answer": row["Correct Answer"],
            "incorrect_answers": [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]}


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("math500", "math", "math500.jsonl", HubSource("HuggingFaceH4/MATH-500"),
             _math_hub("problem", "answer", "unique_id")),
    TaskSpec("aime24", "math", "aime24.jsonl", HubSource("HuggingFaceH4/aime_2024", split="train"),
             _math_hub("problem", "answer", "id")),
    TaskSpec("aime25", "math", "aime25.jsonl", HubSource("yentinglin/aime_2025", split="train"),
             _math_hub("problem", "answer", "id")),
    TaskSpec("amc23", "math", "amc23.jsonl"),
    TaskSpec("gsm8k", "math", "gsm8k_test.jsonl", HubSource("openai/gsm8k", "main"), _gsm8k_hub),
    TaskSpec("gpqa_diamond", "choice", "gpqa_diamond.jsonl",
             HubSource("Idavidrein/gpqa", "gpqa_diamond", "train"), _gpqa_hub),
    TaskSpec("livecodebench", "code", "livecodebench.jsonl",
             HubSource("livecodebench/code_generation_lite", "v4_v5", "test"), lcb_data.from_hub),
]}


def get_spec(name: str) -> TaskSpec:
    """The registered task `name` (error lists the registered names)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; registered tasks are {sorted(TASKS)}")
    return TASKS[name]


def default_data_dir() -> Path | None:
    """$OPENR1_DATA_DIR, else the repository's `data/` (shipped with its provenance)."""
    if os.environ.get("OPENR1_DATA_DIR"):
        return Path(os.environ["OPENR1_DATA_DIR"])
    repo_data = Path(__file__).resolve().parents[2] / "data"
    return repo_data if repo_data.is_dir() else None


def _resolve_source(spec: TaskSpec, source: str | None, data_dir: Path | None,
                    prefer: str) -> str:
    if source is not None:
        return source
    local = (data_dir or default_data_dir() or Path("data")) / (spec.local_file or "")
    if prefer != "hub" and spec.local_file and local.is_file():
        return str(local)
    if prefer == "local" or spec.hub is None:
        raise FileNotFoundError(f"task {spec.name}: no local file {local} and "
                                f"{'no hub source' if spec.hub is None else 'prefer=local'}")
    return spec.hub.name


def load_task(name: str, *, limit: int | None = None, source: str | None = None,
              data_dir: str | Path | None = None, prefer: str = "auto",
              choice_seed: int = DEFAULT_CHOICE_SEED) -> TaskData:
    """Load task `name`'s rows, keep the first `limit`, and prepare them for prompting.

    Args:
        name: a registered task (see `TASKS`).
        limit: keep the first `limit` problems (None: all).
        source: a local file/dir or hub name overriding the task's default.
        data_dir: folder holding the default local files.
        prefer: "auto" (local file if present, else hub), "local" or "hub".
        choice_seed: seed of the choice placement of multiple-choice tasks.
    """
    if prefer not in ("auto", "local", "hub"):
        raise ValueError(f"prefer must be auto, local or hub, got {prefer!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    spec = get_spec(name)
    where = _resolve_source(spec, source, Path(data_dir) if data_dir else None, prefer)
    from_hub = not Path(where).exists()
    hub = spec.hub or HubSource(where)
    raw = read_rows(where, split=hub.split, config=hub.config if from_hub else None)
    if from_hub and spec.from_hub is not None:
        raw = [spec.from_hub(row, i) for i, row in enumerate(raw)]
    rows = _prepare(spec, raw, choice_seed)
    return TaskData(spec, rows[:limit], where, sha256_source(where), len(rows))


_REQUIRED = {"math": ("id", "problem", "answer"),
             "choice": ("id", "problem", "correct_answer", "incorrect_answers"),
             "code": ("id", "problem", "test_cases")}


def _prepare(spec: TaskSpec, rows: list[dict[str, Any]], choice_seed: int) -> list[dict]:
    """Check fields and ids; place multiple choices; decode JSON-string test cases."""
    seen: set[str] = set()
    rng = random.Random(choice_seed)
    out = []
    for i, row in enumerate(rows):
        missing = [f for f in _REQUIRED[spec.kind] if row.get(f) is None]
        if missing:
            raise ValueError(f"task {spec.name}: row {i} lacks field(s) {missing}")
        row = dict(row, id=str(row["id"]))
        if row["id"] in seen:
            raise ValueError(f"task {spec.name}: duplicate problem id {row['id']!r}")
        seen.add(row["id"])
        if spec.kind == "choice":
            row = _place_choices(row, rng.randint(0, 3), spec.name)
        if spec.kind == "code" and isinstance(row["test_cases"], str):
            row["test_cases"] = json.loads(row["test_cases"])
        out.append(row)
    return out


def _place_choices(row: dict[str, Any], gold_index: int, task: str) -> dict[str, Any]:
    incorrect = list(row["incorrect_answers"])
    if len(incorrect) != 3:
        raise ValueError(f"task {task}: row {row['id']} needs 3 incorrect_answers, "
                         f"got {len(incorrect)}")
    choices = incorrect[:gold_index] + [row["correct_answer"]] + incorrect[gold_index:]
    return dict(row, choices=choices, gold_letter=LETTERS[gold_index])


def user_prompt(kind: str, row: dict[str, Any]) -> str:
    """The user message of one problem, as open-r1/lighteval phrase it for this kind."""
    if kind == "math":
        return f"{row['problem']}\n{MATH_INSTRUCTION}"
    if kind == "choice":
        a, b, c, d = row["choices"]
        return GPQA_TEMPLATE.format(question=row["problem"], a=a, b=b, c=c, d=d)
    if kind == "code":
        return lcb_data.prompt(row["problem"], row.get("starter_code"))
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def messages(kind: str, row: dict[str, Any], system_prompt: str | None = None) -> list[dict]:
    """Chat messages for one problem: optional system prompt, then the user prompt."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": user_prompt(kind, row)}]
