"""Streaming safetensors I/O for Hugging Face checkpoint directories.

HFReader reads one tensor at a time with plain `readinto` (no mmap: a memory map keeps
every page it touched resident, so converting a 70B model would count the whole file in
the process's RSS). HFWriter plans shards of at most `max_shard_bytes` from the known
list of (name, shape, dtype), writes each shard's header up front and every tensor's
bytes the moment it arrives, plus `model.safetensors.index.json` when there is more than
one shard; it buffers nothing.

Format: 8-byte little-endian header length, JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes (offsets relative to the end of the header).
"""

from __future__ import annotations

import json
import os
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
        return weight_files(self.dir)

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

    bytes_read: int = 0
    """Tensor bytes `get` and `get_slice` have requested from the files so far."""

    def get(self, name: str) -> torch.Tensor:
        """Read tensor `name` into a fresh CPU tensor."""
        file, entry, data_start = self._entry(name)
        start, end = entry["data_offsets"]
        self.bytes_read += end - start
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(file, "rb") as f:
            f.seek(data_start + start)
            if f.readinto(buf.numpy()) != end - start:
                raise OSError(f"{file}: truncated data for tensor {name}")
        return buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Read only `tensor[..., start:stop, ...]` (along `dim`) of tensor `name`.

        The slice is `prod(shape[:dim])` contiguous runs of the file, one `pread` each
        (dim 0: a single run), so a tensor-parallel rank reads its shard and nothing else.
        """
        file, entry, data_start = self._entry(name)
        shape, dtype = list(entry["shape"]), DTYPES[entry["dtype"]]
        if not (0 <= dim < len(shape) and 0 <= start <= stop <= shape[dim]):
            raise ValueError(f"{file}: slice [{start}:{stop}] of dim {dim} is outside tensor "
                             f"{name} of shape {tuple(shape)}")
        inner = torch.Size(shape[dim + 1:]).numel() * torch.empty((), dtype=dtype).element_size()
        outer, run = torch.Size(shape[:dim]).numel(), (stop - start) * inner
        buf = torch.empty(outer * run, dtype=torch.uint8)
        fd = os.open(file, os.O_RDONLY)
        try:
            for i in range(outer):
                offset = data_start + entry["data_offsets"][0] + (i * shape[dim] + start) * inner
                if _pread_into(fd, buf[i * run:(i + 1) * run].numpy(), offset) != run:
                    raise OSError(f"{file}: truncated data for tensor {name}")
        finally:
            os.close(fd)
        self.bytes_read += outer * run
        return buf.view(dtype).reshape(shape[:dim] + [stop - start] + shape[dim + 1:])

    def _entry(self, name: str) -> tuple[Path, dict, int]:
        if name not in self._entries:
            raise KeyError(f"{self.dir}: checkpoint has no tensor {name!r}")
        return self._entries[name]


class HFWriter:
    """Stream tensors straight into safetensors shards planned from their names and shapes.

    The whole output is known before the first byte (the weight map gives every name,
    shape and dtype), so each shard's header is written when the shard is opened and every
    tensor goes to disk as soon as it arrives: nothing is buffered. Tensors must arrive
    in `entries` order; a different name, shape or dtype is an error.
    """

    def __init__(self, out_dir: str | Path, entries: list[tuple[str, tuple[int, ...],
                                                               torch.dtype]],
                 max_shard_bytes: int = 2 << 30) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._shards = _plan_shards(entries, max_shard_bytes)
        n = len(self._shards)
        self._names = [SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                       for i in range(n)]
        self._queue = [(i, e) for i, shard in enumerate(self._shards) for e in shard]
        self._next = 0
        self._file = None
        self.total_bytes = sum(_nbytes(shape, dtype) for _, shape, dtype in entries)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor."""
        if self._next >= len(self._queue):
            raise ValueError(f"tensor {name!r} is beyond the planned {len(self._queue)}")
        shard, (want, shape, dtype) = self._queue[self._next]
        got = (name, tuple(tensor.shape), tensor.dtype)
        if got != (want, tuple(shape), dtype):
            raise ValueError(f"expected tensor {(want, tuple(shape), dtype)}, got {got}")
        if self._file is None:
            self._file = open(self.dir / self._names[shard], "wb")
            _write_header(self._file, self._shards[shard])
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(data.numpy())  # buffer protocol: no copy
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Check every planned tensor arrived; write the index when there are shards."""
        if self._next != len(self._queue):
            missing = [e[0] for _, e in self._queue[self._next:]][:5]
            raise ValueError(f"{len(self._queue) - self._next} planned tensors never written, "
                             f"e.g. {missing}")
        if len(self._shards) > 1:
            weight_map = {name: self._names[i] for i, shard in enumerate(self._shards)
                          for name, _, _ in shard}
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / INDEX).write_text(json.dumps(index, indent=2))


def _plan_shards(entries: list, max_shard_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for name, shape, dtype in entries:
        nbytes = _nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype))
        size += nbytes
    return shards


def _nbytes(shape, dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _write_header(f, entries: list) -> None:
    header, offset = {}, 0
    for name, shape, dtype in entries:
        nbytes = _nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


def copy_hf_assets(src: str | Path, dst: str | Path) -> None:
    """Copy config, generation config and tokenizer files (everything but weights)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for file in Path(src).iterdir():
        if file.is_file() and not file.name.endswith(WEIGHT_SUFFIXES) and file.name != INDEX:
            shutil.copy2(file, dst / file.name)


def _pread_into(fd: int, out, offset: int) -> int:
    """Fill the buffer `out` from `offset` (one read caps near 2 GiB); bytes read."""
    view, done = memoryview(out).cast("B"), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory: the index's shards, or every
    *.safetensors file. Each must exist; errors name the directory, index or shard."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({err!r})") \
                from err
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shard(s) that are absent: {absent}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    return files


def _read_header(file: Path) -> tuple[dict, int]:
    """(header, offset of the data) of a safetensors file, checked against the file's size:
    a truncated or corrupt file is a ValueError naming it (not a bare decode error)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        if size < 8:
            raise ValueError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", f.read(8))
        if 8 + length > size:
            raise ValueError(f"{file}: truncated safetensors file (header of {length} bytes, "
                             f"file of {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}: corrupt safetensors header ({err})") from err
    _check_extent(file, header, size - 8 - length)
    return header, 8 + length


def _check_extent(file: Path, header: object, data_bytes: int) -> None:
    """Every tensor's byte range must lie inside the file and have a known dtype."""
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupt safetensors header (not a JSON object)")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            dtype = entry["dtype"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{file}: corrupt safetensors header entry {name!r}") from err
        if dtype not in DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
        if not 0 <= start <= end <= data_bytes:
            raise ValueError(f"{file}: truncated safetensors file (tensor {name!r} ends at "
                             f"byte {end} of the data, the file holds {data_bytes})")
