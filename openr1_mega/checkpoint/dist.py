"""Megatron distributed checkpoints: atomic save, resharding load, resume metadata.

    save(model, optimizer, {"step": 100, ...}, "ckpt/step_100", hf_assets=hf_dir)
    extra = load(model, optimizer, "ckpt/step_100")      # any TP/PP/EP layout

Layout of a checkpoint directory:
    <Megatron torch_dist files>   sharded tensors (.distcp + .metadata), common.pt,
                                  metadata.json; keys are Megatron's global sharded keys,
                                  so the checkpoint loads under any TP/PP/EP (vocab rows
                                  beyond a smaller padding are dropped, extra ones zeroed)
    openr1_checkpoint.json        what wrote it: arch, vocab sizes, layout, dtype, world size
    hf/                           config.json (+ tokenizer files when given), so that
                                  `convert_checkpoint.py mcore-to-hf` can export it
    manifest.json                 size and sha256 of every other file (written last)

State dict: {"model": ..., "optimizer": ... (if any), "extra_state": dict, "rank_state":
per-rank ShardedObject (if given)}. `extra_state` is common state (rank 0's copy is
stored): step, seed, config, ...; `rank_state` is what differs per rank (RNG states).

Atomicity: everything is written into a hidden sibling directory; every rank hashes and
fsyncs its share of the files (sha256 digests meet in one tensor all-reduce); rank 0
writes the manifest, fsyncs the directory and renames it onto `path`, then fsyncs the
parent. A crash leaves at worst a hidden `.<name>.tmp-*` directory, never a half-written
`path`; an existing `path` is replaced only with `overwrite=True`.

A training run's checkpoints live in one root (`<output_dir>/checkpoints`): `step_NNNNNN`
directories and a `latest` file naming the newest committed one. `commit` rewrites
`latest` atomically after the rename (the commit point) and prunes to the newest K;
`find_resumable` starts at `latest` (or, without it, the newest directory), verifies each
candidate against its manifest on all ranks, and falls back past corrupt ones, naming
them and their bad files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from openr1_mega.checkpoint.safetensors_io import copy_hf_assets
from openr1_mega.config.schema import ArchConfig
from openr1_mega.config.to_megatron import precision_name
from openr1_mega.models.build import model_arch, unwrap
from openr1_mega.utils.io import atomic_file, fsync_dir

INFO_FILE = "openr1_checkpoint.json"
MANIFEST = "manifest.json"
LATEST = "latest"
HF_SUBDIR = "hf"
FORMAT = "openr1-mega/megatron-dist"
_STEP_DIR = re.compile(r"step_(\d+)")


def save(model, optimizer, extra_state: dict[str, Any], path: str | Path, *,
         hf_assets: str | Path | None = None, overwrite: bool = False,
         rank_state: Any = None) -> Path:
    """Save model (+ optimizer) shards, `extra_state` (rank 0's) and `rank_state` (each
    rank's own, e.g. RNG states) to `path` (collective, atomic, fsynced, with manifest)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tmp = _shared_tmp_dir(path)
    state = {"model": unwrap(model).sharded_state_dict(), "extra_state": dict(extra_state)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"])
    if rank_state is not None:
        state["rank_state"] = _rank_object(rank_state)
    dist_checkpointing.save(state, str(tmp))
    if dist.get_rank() == 0:
        gpt = unwrap(model)
        write_info(tmp, model_arch(model), gpt.vocab_size, _layout(gpt),
                   precision_name(gpt.config.params_dtype), hf_assets)
    dist.barrier()
    files = _files(tmp)
    digests = _digests(tmp, files)  # collective: each rank hashes + fsyncs its share
    if dist.get_rank() == 0:
        write_manifest(tmp, files, digests)
        publish(tmp, path, overwrite)
    dist.barrier()
    return path


def load(model, optimizer, path: str | Path, *, strict: bool = True,
         rank_state: bool = False) -> dict[str, Any]:
    """Load `path` into `model` (+ `optimizer`) for this rank's layout; returns extra_state,
    plus this rank's saved `rank_state` under that key when asked and the world size
    matches the one that saved it (else None)."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path}: not a Megatron distributed checkpoint")
    gpt = unwrap(model)
    state = {"model": gpt.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True)
    same_world = read_info(path).get("world_size") == dist.get_world_size()
    if rank_state and same_world:
        state["rank_state"] = _rank_object(None)
    loaded = dist_checkpointing.load(state, str(path))
    gpt.load_state_dict(loaded["model"], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    extra = dict(loaded.get("extra_state", {}))
    if rank_state:
        extra["rank_state"] = loaded.get("rank_state")
    return extra


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (CPU, CUDA when present), numpy, python, and
    Megatron's model-parallel tracker (dropout streams per TP/EP rank)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate(), "tracker": dict(get_cuda_rng_tracker().get_states())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_info(ckpt_dir: Path, arch: ArchConfig, padded_vocab: int, layout: dict, dtype: str,
               hf_assets: str | Path | None) -> None:
    """Write openr1_checkpoint.json and hf/ (config.json from the arch, assets if given)."""
    hf_dir = Path(ckpt_dir) / HF_SUBDIR
    if hf_assets is not None:
        copy_hf_assets(hf_assets, hf_dir)
    else:
        hf_dir.mkdir(parents=True, exist_ok=True)
        (hf_dir / "config.json").write_text(json.dumps(arch.hf_config, indent=2))
    world = dist.get_world_size() if dist.is_initialized() else 1
    info = {"format": FORMAT, "version": 1, "arch": arch.arch, "vocab_size": arch.vocab_size,
            "padded_vocab_size": padded_vocab, "layout": layout, "dtype": dtype,
            "hf_assets": HF_SUBDIR, "world_size": world}
    (Path(ckpt_dir) / INFO_FILE).write_text(json.dumps(info, indent=2))


def read_info(ckpt_dir: str | Path) -> dict:
    """The openr1_checkpoint.json of a checkpoint directory."""
    file = Path(ckpt_dir) / INFO_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no {INFO_FILE} (not written by openr1-mega)")
    return json.loads(file.read_text())


def write_manifest(ckpt_dir: Path, files: list[str], digests: list[str]) -> None:
    """manifest.json: {relative path: {size, sha256}} of every file, fsynced with its
    directories (the checkpoint is durable once this returns)."""
    entries = {name: {"size": (ckpt_dir / name).stat().st_size, "sha256": digest}
               for name, digest in zip(files, digests)}
    with atomic_file(ckpt_dir / MANIFEST) as f:
        json.dump({"files": entries}, f, indent=1)
    for directory in sorted({(ckpt_dir / n).parent for n in files} | {ckpt_dir}):
        fsync_dir(directory)


def verify(ckpt_dir: str | Path, rank: int = 0, world: int = 1) -> list[str]:
    """Problems of a checkpoint against its manifest (empty: intact). Every rank checks all
    sizes and hashes its round-robin share of the files (rank, world)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        entries = json.loads((ckpt_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return [f"{ckpt_dir / MANIFEST}: unreadable manifest ({err})"]
    problems = []
    for i, (name, want) in enumerate(sorted(entries.items())):
        file = ckpt_dir / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != want["size"]:
            problems.append(f"{file}: {file.stat().st_size} bytes, manifest says {want['size']}")
        elif i % world == rank and _sha256(file) != want["sha256"]:
            problems.append(f"{file}: sha256 differs from the manifest")
    return problems


def tmp_dir_for(path: Path) -> Path:
    """A fresh hidden sibling of `path` to write into before `publish`."""
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` onto `path` (replacing it only if `overwrite`), then fsync
    the parent directory so the rename itself survives a power loss."""
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)


def step_dir(root: str | Path, step: int) -> Path:
    """The directory of a run's checkpoint after `step` optimizer steps."""
    return Path(root) / f"step_{step:06d}"


def latest_step(root: str | Path) -> int | None:
    """The step the `latest` pointer of a checkpoint root names (None: no pointer)."""
    file = Path(root) / LATEST
    match = _STEP_DIR.fullmatch(file.read_text().strip()) if file.is_file() else None
    return int(match[1]) if match else None


def commit(root: str | Path, path: Path, keep: int) -> None:
    """Point `latest` at the saved `path` (atomic rename, the commit point), then keep the
    newest `keep` checkpoints (0: all). Collective; rank 0 writes."""
    root = Path(root)
    if dist.get_rank() == 0:
        with atomic_file(root / LATEST) as f:
            f.write(path.name + "\n")
        fsync_dir(root)
        prune(root, keep)
    dist.barrier()


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` step directories (never the `latest` one) and the
    hidden temp directories that killed writes left behind."""
    current = latest_step(root)
    for step in (_published_steps(root)[keep:] if keep else []):
        if step != current:
            shutil.rmtree(step_dir(root, step))
    for leftover in root.glob(".step_*"):
        shutil.rmtree(leftover, ignore_errors=True)


def find_resumable(root: str | Path) -> Path | None:
    """The newest intact committed checkpoint under `root`, or None (collective).

    Rank 0 lists the candidates (the `latest` one, then older ones, newest first; a
    directory newer than `latest` is an uncommitted write and is never picked); every
    rank verifies its share of each candidate's files and one all-reduce gives the
    verdict. A corrupt candidate is reported with its path and skipped.
    """
    root = Path(root)
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = _broadcast_steps(_candidate_steps(root) if rank == 0 else [])
    for step in steps:
        path = step_dir(root, step)
        problems = verify(path, rank, world)
        bad = torch.tensor([len(problems)], dtype=torch.int64)
        dist.all_reduce(bad)  # collective: every rank reaches it for every candidate
        if problems:
            warnings.warn(f"rank {rank}: checkpoint {path} is corrupt, skipping it for the "
                          f"previous one: {'; '.join(problems[:5])}", stacklevel=2)
        elif int(bad) and rank == 0:
            warnings.warn(f"checkpoint {path} failed verification on another rank, skipping "
                          "it for the previous one", stacklevel=2)
        if int(bad) == 0:
            return path
    return None


def _candidate_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    published = _published_steps(root)
    latest = latest_step(root)
    if latest is None:
        return published
    return [latest] + [s for s in published if s < latest]


def _published_steps(root: Path) -> list[int]:
    """Steps of the (renamed, so complete or corrupted later) step directories, newest first."""
    matches = (_STEP_DIR.fullmatch(p.name) for p in root.iterdir() if p.is_dir())
    return sorted((int(m[1]) for m in matches if m), reverse=True)


def _broadcast_steps(steps: list[int]) -> list[int]:
    """Rank 0's list of step numbers on every rank (two small tensor broadcasts)."""
    count = torch.tensor([len(steps)], dtype=torch.int64)
    dist.broadcast(count, src=0)
    values = torch.tensor(steps, dtype=torch.int64) if steps else torch.zeros(int(count),
                                                                              dtype=torch.int64)
    dist.broadcast(values, src=0)
    return values.tolist()


def _shared_tmp_dir(path: Path) -> Path:
    """The temp directory of `path`, named by rank 0 (a random number broadcast as a tensor)."""
    token = torch.tensor([uuid.uuid4().int % 2**62 if dist.get_rank() == 0 else 0])
    dist.broadcast(token, src=0)
    tmp = path.parent / f".{path.name}.tmp-{int(token):016x}"
    if dist.get_rank() == 0:
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


def _rank_object(data: Any) -> ShardedObject:
    """One object per global rank (RNG states differ per rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rank_state", data, (world,), (rank,), replica_id=0)


def _files(ckpt_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def _digests(ckpt_dir: Path, files: list[str]) -> list[str]:
    """sha256 of every file: each rank hashes (and fsyncs) a round-robin share; the digests
    meet in one all-reduce of a [files, 32] tensor (zeros elsewhere)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    table = torch.zeros(len(files), 32, dtype=torch.int32)
    for i in range(rank, len(files), world):
        table[i] = torch.tensor(list(bytes.fromhex(_sha256(ckpt_dir / files[i], fsync=True))))
    dist.all_reduce(table)  # collective
    return [bytes(row.tolist()).hex() for row in table]


def _sha256(file: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _layout(gpt) -> dict:
    c = gpt.config
    return {"tp": c.tensor_model_parallel_size, "pp": c.pipeline_model_parallel_size,
            "ep": c.expert_model_parallel_size, "etp": c.expert_tensor_parallel_size,
            "cp": c.context_parallel_size}
