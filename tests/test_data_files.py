"""The repository carries its own data: checksums hold, rows follow the schema, and no
code, recipe or test reads a `shared/` folder beside the clone."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
SUMS = dict(reversed(line.split()) for line in (DATA / "SHA256SUMS").read_text().splitlines())


@pytest.mark.parametrize("name", sorted(SUMS))
def test_checksum_and_schema(name):
    path = DATA / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SUMS[name], f"{path} changed"
    # split on "\n" only: str.splitlines also breaks at U+2028 etc. inside JSON strings
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids), f"{name}: duplicate ids"
    for r in rows:
        assert isinstance(r["problem"], str) and r["problem"].strip(), (name, r["id"])
        assert isinstance(r["answer"], str) and r["answer"].strip(), (name, r["id"])


def test_every_recipe_data_file_is_shipped():
    for recipe in (REPO / "examples/recipes").rglob("*.yaml"):
        for path in re.findall(r"source:\s*(data/\S+\.jsonl)", recipe.read_text()):
            assert (REPO / path).is_file(), f"{recipe}: {path} is not in the repository"


def test_nothing_reads_beside_the_clone():
    pattern = re.compile(r"\.\./shared|[\"'/]shared/data")
    offenders = [str(f.relative_to(REPO)) for top in ("openr1_mega", "tools", "examples", "tests")
                 for f in (REPO / top).rglob("*")
                 if f.suffix in {".py", ".sh", ".yaml"} and f.name != Path(__file__).name
                 and pattern.search(f.read_text(errors="replace"))]
    assert not offenders, f"these read a folder a fresh clone lacks: {offenders}"


def test_eval_tasks_default_to_the_shipped_data(monkeypatch):
    from openr1_mega.eval import tasks

    monkeypatch.delenv("OPENR1_DATA_DIR", raising=False)
    assert tasks.default_data_dir() == DATA
