"""Crash-safe parquet shards of an HF dataset, written one at a time, plus a progress manifest.

Layout of an output directory (loadable with `datasets.load_dataset(<dir>/data)` or
`load_dataset("parquet", data_files="<dir>/data/*.parquet")`):
    manifest.json                         run settings, shard list, skipped problems
    data/train-00003-of-00010.parquet     one shard per fixed chunk of problems
Why it survives kill -9: a shard is written to a temp file in the same directory, fsynced,
then renamed (atomic on POSIX) and the directory fsynced; so a shard file either exists
whole or not at all. The shard files, not the manifest, say what is done: a kill between a
shard's rename and the manifest update loses nothing, and a restart that finds the
manifest behind simply rewrites it. Temp files left by a kill are deleted on open.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from openr1_mega.eval.sources import write_atomic
from openr1_mega.utils.io import atomic_file, fsync_dir

_SHARD = re.compile(r"train-(\d{5})-of-(\d{5})\.parquet")

SKIPPED_KEY = "openr1_mega.skipped_problems"
"""Shard metadata key: JSON {reason: [problem id]} of the chunk's problems without rows."""

ROW_FIELDS = ("problem_id", "sample_index", "problem", "answer", "messages", "completion",
              "finish_reason", "prompt_tokens", "completion_tokens")


def row_schema() -> Any:
    """The Arrow schema of one generated row (explicit, so every shard has the same types)."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([("problem_id", pa.string()), ("sample_index", pa.int32()),
                      ("problem", pa.string()), ("answer", pa.string()),
                      ("messages", pa.list_(message)), ("completion", pa.string()),
                      ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()),
                      ("completion_tokens", pa.int32())])


def write_parquet_atomic(path: Path, rows: list[dict[str, Any]], schema: Any = None,
                         metadata: dict[str, str] | None = None) -> Path:
    """Write rows to `path` via temp file + fsync + rename + directory fsync.

    `metadata` (str -> str) goes into the file's schema metadata, atomically with the rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_file(path, "wb") as f:
        pq.write_table(table, f)
    fsync_dir(path.parent)
    return path


class ShardStore:
    """The shards and manifest of one output directory for a run of `num_shards` chunks.

    Args:
        out_dir: the output directory (created if missing).
        num_shards: how many chunks the whole run has (fixed by the problems and shard size).
        settings: what produced the data; a restart with different settings is refused.
    """

    def __init__(self, out_dir: str | Path, num_shards: int, settings: dict[str, Any]):
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.out_dir = Path(out_dir)
        self.data_dir = self.out_dir / "data"
        self.num_shards = num_shards
        self.settings = settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_settings()
        for stale in self.data_dir.glob(".*.tmp"):
            stale.unlink()

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / "manifest.json"

    def _check_settings(self) -> None:
        if not self.manifest_path.exists():
            return
        previous = json.loads(self.manifest_path.read_text())["settings"]
        changed = sorted(k for k in set(previous) | set(self.settings)
                         if previous.get(k) != self.settings.get(k))
        if changed:
            raise ValueError(f"{self.out_dir} holds a run with different settings {changed}; "
                             "use a new output directory to change them")

    def shard_path(self, index: int) -> Path:
        return self.data_dir / f"train-{index:05d}-of-{self.num_shards:05d}.parquet"

    def done(self) -> set[int]:
        """Indices of the shards present on disk (each complete, by the atomic rename)."""
        found = set()
        for path in self.data_dir.glob("train-*.parquet"):
            match = _SHARD.fullmatch(path.name)
            if match is None or int(match.group(2)) != self.num_shards:
                raise ValueError(f"{path} does not belong to a run of {self.num_shards} shards")
            found.add(int(match.group(1)))
        return found

    def write(self, index: int, rows: list[dict[str, Any]],
              skipped: dict[str, list[str]] | None = None) -> Path:
        """Write shard `index` atomically, with the ids of the chunk's problems that were
        skipped ({reason: [problem id]}) in its metadata."""
        if not 0 <= index < self.num_shards:
            raise ValueError(f"shard index must be in [0, {self.num_shards}), got {index}")
        metadata = {SKIPPED_KEY: json.dumps(skipped or {})}
        return write_parquet_atomic(self.shard_path(index), rows, row_schema(), metadata)

    def skipped(self, index: int) -> dict[str, list[str]]:
        """{reason: [problem id]} of shard `index`'s problems that have no rows."""
        import pyarrow.parquet as pq

        metadata = pq.read_schema(self.shard_path(index)).metadata or {}
        return json.loads(metadata.get(SKIPPED_KEY.encode(), b"{}"))

    def read_column(self, index: int, column: str) -> list[Any]:
        import pyarrow.parquet as pq

        return pq.read_table(self.shard_path(index), columns=[column]).column(0).to_pylist()

    def update_manifest(self) -> dict[str, Any]:
        """Rewrite manifest.json from the shards on disk (atomically); returns it."""
        done = sorted(self.done())
        skipped: dict[str, list[str]] = {}
        for index in done:
            for reason, ids in self.skipped(index).items():
                skipped.setdefault(reason, []).extend(ids)
        manifest = {"settings": self.settings, "num_shards": self.num_shards,
                    "completed_shards": [self.shard_path(i).name for i in done],
                    "complete": len(done) == self.num_shards,
                    "skipped_problems": {reason: len(ids) for reason, ids in skipped.items()},
                    "skipped_problem_ids": skipped}
        write_atomic(self.manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False))
        return manifest
