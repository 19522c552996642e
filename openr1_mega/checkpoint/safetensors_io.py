"""Streaming safetensors I/O for Hugging Face checkpoint directories.

HFReader reads one tensor at a time with plain `readinto` (no mmap: a memory map keeps
every page it touched resident, so converting a 70B model would count the whole file in
the process's RSS). HFWriter buffers tensors into shards of at most `max_shard_bytes`
and writes each shard when it is full, plus `model.safetensors.index.json` when there is
more than one; peak memory is one shard plus the tensors being produced.

Format: 8-byte little-endian header length, JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes (offsets relative to the end of the header).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


class HFReader:
    """Read tensors by name from a HF model dir (single file or sharded with an index)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        for file in self._files():
            header, data_start = _read_header(file)
            for name, entry in header.items():
                if name != "__metadata__":
                    self._entries[name] = (file, entry, data_start)

    def _files(self) -> list[Path]:
        if (self.dir / INDEX).is_file():
            weight_map = json.loads((self.dir / INDEX).read_text())["weight_map"]
            return [self.dir / f for f in sorted(set(weight_map.values()))]
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.dir}: no *.safetensors files")
        return files

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` (from the header, nothing read)."""
        return tuple(self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        """dtype of tensor `name` (from the header, nothing read)."""
        return DTYPES[self._entry(name)[1]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        """Read tensor `name` into a fresh CPU tensor."""
        file, entry, data_start = self._entry(name)
        start, end = entry["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(file, "rb") as f:
            f.seek(data_start + start)
            if f.readinto(buf.numpy()) != end - start:
                raise OSError(f"{file}: truncated data for tensor {name}")
        return buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def _entry(self, name: str) -> tuple[Path, dict, int]:
        if name not in self._entries:
            raise KeyError(f"{self.dir}: checkpoint has no tensor {name!r}")
        return self._entries[name]


class HFWriter:
    """Write tensors into safetensors shards of bounded size, then the index."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 << 30) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._weight_map: dict[str, str] = {}
        self._shards: list[str] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; a full shard is written out first."""
        if name in self._weight_map or name in self._buffer:
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered + size > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = tensor.detach().cpu().contiguous()
        self._buffered += size

    def flush(self) -> None:
        """Write the buffered tensors as the next shard."""
        if not self._buffer:
            return
        shard = f"model-{len(self._shards) + 1:05d}.safetensors"
        write_safetensors(self.dir / shard, self._buffer)
        self._shards.append(shard)
        self._weight_map.update(dict.fromkeys(self._buffer, shard))
        self.total_bytes += self._buffered
        self._buffer, self._buffered = {}, 0

    def close(self) -> None:
        """Flush, then name shards model-0000i-of-0000n (or model.safetensors) + index."""
        self.flush()
        n = len(self._shards)
        names = {s: SINGLE if n == 1 else s.replace(".safetensors", f"-of-{n:05d}.safetensors")
                 for s in self._shards}
        for old, new in names.items():
            (self.dir / old).rename(self.dir / new)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: names[v] for k, v in sorted(self._weight_map.items())}}
            (self.dir / INDEX).write_text(json.dumps(index, indent=2))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` to one safetensors file, streaming each tensor's bytes."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy


def copy_hf_assets(src: str | Path, dst: str | Path) -> None:
    """Copy config, generation config and tokenizer files (everything but weights)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for file in Path(src).iterdir():
        if file.is_file() and not file.name.endswith(WEIGHT_SUFFIXES) and file.name != INDEX:
            shutil.copy2(file, dst / file.name)


def _read_header(file: Path) -> tuple[dict, int]:
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length
