"""Where problem rows come from: local jsonl/json/parquet files, or HF datasets by hub name.

Also the content hashes recorded with every result (sha256 of the file bytes, and of the
rows actually used, as canonical JSON) and an atomic JSON/JSONL writer. Used by the eval
tasks, the distillation generator and decontamination alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from openr1_mega.utils.io import atomic_file

_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_local(source: str | Path) -> bool:
    """True when `source` names an existing file or directory on this machine."""
    return Path(source).exists()


def read_rows(source: str | Path, *, split: str = "train", config: str | None = None,
              revision: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local file/directory, or of a hub dataset when `source` is not a path.

    Args:
        source: a .jsonl/.json/.parquet file, a directory of them (read in name order), or
            a hub dataset name such as "HuggingFaceH4/MATH-500".
        split, config, revision: hub split, configuration and revision (hub only).
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _LOCAL_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"source directory {path} has no {_LOCAL_SUFFIXES} files")
        return [row for f in files for row in _read_file(f)]
    if path.is_file():
        return _read_file(path)
    return _read_hub(str(source), split=split, config=config, revision=revision)


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a UTF-8 JSON document ({err})") from err
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json source must hold a list of rows")
        return data
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"source file {path} must end in one of {_LOCAL_SUFFIXES}")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSONL file; a bad line (not UTF-8, not JSON, not an object, over the
    row size limit) is an error naming the file and its 1-based line number."""
    from openr1_mega.data.prompts import parse_jsonl_line

    rows = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            row, problem = parse_jsonl_line(raw)
            if problem is not None:
                raise ValueError(f"{path}:{number}: {problem}")
            rows.append(row)
    return rows


def _read_hub(name: str, *, split: str, config: str | None,
              revision: str | None) -> list[dict[str, Any]]:
    """Load a hub dataset; fails with a message naming it when the hub is unreachable."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as exc:  # re-raised with the dataset named
        raise FileNotFoundError(
            f"{name!r} is neither a local file nor a loadable hub dataset "
            f"(config={config}, split={split}): {type(exc).__name__}: {exc}") from exc
    return [dict(row) for row in dataset]


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_source(source: str | Path) -> str | None:
    """sha256 of a local file, or of a directory's files in name order; None for the hub."""
    path = Path(source)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.iterdir() if p.suffix in _LOCAL_SUFFIXES):
            digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
        return digest.hexdigest()
    return None


def sha256_rows(rows: Iterable[dict[str, Any]]) -> str:
    """sha256 of rows as canonical JSON lines (sorted keys): identifies the exact rows used."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def write_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temp file + fsync + rename (never half-written)."""
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSON lines, atomically."""
    lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    return write_atomic(path, lines)
