"""Offline, streaming HF <-> Megatron dist-checkpoint conversion in one process.

Neither direction holds the model: a Megatron GPTModel is built on the *meta* device (TP=PP=
EP=1, i.e. every tensor in full) only to obtain Megatron's own sharded state dict (keys,
global shapes, the gate/up factories), and tensors are produced or consumed one at a time.

hf_to_mcore: torch DCP saves the meta state dict through a planner whose `resolve_data`
  computes each Megatron tensor from the HF safetensors when the writer asks for it
  (`_LazyPlanner`), and a writer that writes items one by one without keeping them
  (`_StreamingWriter`). A meta tensor is traced to its parameter through its storage and
  re-viewed (as_strided) on the real tensor, so factory slices (gate/up halves) work too.
  Peak memory: about one parameter (the largest, often the embedding) plus one item.
mcore_to_hf: layer group by layer group, real tensors are allocated for the group's
  entries of the meta state dict, `dist_checkpointing.load` fills them (any saved TP/PP/EP
  layout; Megatron reshards), the weight map turns them into HF tensors, and HFWriter
  streams them into pre-planned shards. Peak memory: about one layer group.
Because torch_dist checkpoints are layout-independent, `--tp/--pp/--ep` at conversion only
validate the layout and set the vocabulary padding (multiple of 128 x TP).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistLoadShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
from torch.distributed.checkpoint.planner import WriteItemType
from tqdm import tqdm

from openr1_mega.checkpoint.dist import (
    HF_SUBDIR,
    publish,
    read_info,
    tmp_dir_for,
    write_info,
)
from openr1_mega.checkpoint.hf import export_plan, param_index
from openr1_mega.checkpoint.safetensors_io import HFReader, HFWriter, copy_hf_assets
from openr1_mega.config.schema import ArchConfig, ParallelConfig, PrecisionConfig
from openr1_mega.config.to_megatron import TORCH_DTYPES, precision_name
from openr1_mega.models.archs import arch_config, weight_map
from openr1_mega.models.archs.common import to_hf, to_mcore
from openr1_mega.models.build import build_model, validate_layout
from openr1_mega.parallel import init


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, parallel: ParallelConfig, *,
                dtype: str | None = None, force: bool = False, progress: bool = True) -> Path:
    """Convert an HF checkpoint into a Megatron dist checkpoint at `out_dir` (atomic)."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    arch = arch_config(hf_dir)
    validate_layout(arch, parallel)
    _check_output(out, force)
    reader = HFReader(hf_dir)
    precision = dtype or _source_precision(reader)
    model = _meta_model(arch, precision, parallel.tp)
    params = param_index(model)
    rules = {r.mcore: r for r in weight_map(arch).rules() if r.mcore in params}
    missing = sorted(set(params) - set(rules))
    if missing:
        raise ValueError(f"parameters not covered by the {arch.arch} weight map: {missing}")
    bar = tqdm(total=len(params), desc="hf-to-mcore", unit="tensor", disable=not progress)

    def compute(name: str) -> torch.Tensor:
        rule = rules[name]
        bar.update()
        full = to_mcore(rule, [reader.get(n) for n in rule.hf], arch, model.vocab_size)
        return full.to(params[name].dtype)

    tmp = tmp_dir_for(out)
    tmp.mkdir(parents=True)
    state = {"model": model.sharded_state_dict(),
             "extra_state": {"converted_from": str(hf_dir)}}
    dist_checkpointing.save(state, str(tmp), sharded_strategy=_StreamingSave(
        _Materializer(params, compute)))
    bar.close()
    write_info(tmp, arch, model.vocab_size, _layout_dict(parallel), precision, hf_dir)
    publish(tmp, out, force)
    return out


def mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
                force: bool = False, progress: bool = True,
                max_shard_bytes: int = 2 << 30) -> Path:
    """Convert a Megatron dist checkpoint (from hf_to_mcore or training) into an HF dir."""
    mcore_dir, out = Path(mcore_dir), Path(out_dir)
    info = read_info(mcore_dir)
    assets = mcore_dir / info.get("hf_assets", HF_SUBDIR)
    arch = arch_config(assets)
    _check_output(out, force)
    model = _meta_model(arch, dtype or info["dtype"], info["layout"]["tp"])
    state, out_dtype = model.sharded_state_dict(), TORCH_DTYPES.get(dtype)
    tmp = tmp_dir_for(out)
    writer = HFWriter(tmp, export_plan(arch, out_dtype or TORCH_DTYPES[info["dtype"]]),
                      max_shard_bytes)
    wmap = weight_map(arch)
    for _, rules in tqdm(list(wmap.groups()), desc="mcore-to-hf", unit="group",
                         disable=not progress):
        exported = [r for r in rules if r.export]
        loaded = _load_entries(state, [r.mcore for r in exported], mcore_dir)
        for rule in exported:
            for name, tensor in zip(rule.hf, to_hf(rule, loaded[rule.mcore], arch), strict=True):
                writer.add(name, tensor if out_dtype is None else tensor.to(out_dtype))
    writer.close()
    copy_hf_assets(assets, tmp)
    if dtype is not None:
        _set_config_dtype(tmp / "config.json", out_dtype)
    publish(tmp, out, force)
    return out


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Record the exported dtype in config.json (transformers' `dtype`, older `torch_dtype`)."""
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = name
    config_file.write_text(json.dumps(config, indent=2))


def _load_entries(state: dict, names: list[str], ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Load the full tensors of entries `names` of a meta sharded state dict.

    Megatron's loader turns layer-stacked keys (a prepended layer axis) into legacy torch
    ShardedTensors that must cover every layer of the key in this process; requesting
    one layer needs the newer per-chunk path, so the prepended axes are folded into
    plain leading dimensions of size 1 first. Data is loaded in place into `full`.
    """
    sub, full = {}, {}
    for name in names:  # shallow copies: `state` keeps its meta tensors, memory is freed
        entry = copy.copy(state[name])
        entry.data = full[name] = torch.empty(entry.data.shape, dtype=entry.data.dtype)
        sub[name] = entry
    apply_factories(sub)
    shards = {str(i): _fold_prepended_axes(t) for i, t in enumerate(nested_values(sub))}
    TorchDistLoadShardedStrategy().load(shards, Path(ckpt_dir))
    return full


def _fold_prepended_axes(sh_ten: ShardedTensor) -> ShardedTensor:
    n = sh_ten.prepend_axis_num
    if not n:
        return sh_ten
    shape = (1,) * n + tuple(sh_ten.local_shape)
    return dataclasses.replace(sh_ten, data=sh_ten.data.view(shape), local_shape=shape,
                               prepend_axis_num=0)


class _Materializer:
    """Turn meta tensors (parameters or views of them) into real ones, one parameter cached."""

    def __init__(self, params: dict[str, torch.Tensor], compute) -> None:
        self._names = {p.untyped_storage()._cdata: n for n, p in params.items()}
        self._compute = compute
        self._cached: tuple[str | None, torch.Tensor | None] = (None, None)

    def __call__(self, meta: torch.Tensor) -> torch.Tensor:
        name = self._names[meta.untyped_storage()._cdata]
        if self._cached[0] != name:
            self._cached = (None, None)  # drop the previous parameter before computing
            self._cached = (name, self._compute(name).contiguous())
        full = self._cached[1]
        return torch.as_strided(full, meta.shape, meta.stride(), meta.storage_offset())


class _LazyPlanner(MCoreSavePlanner):
    """MCore's save planner, but tensor data is computed when the writer asks for it."""

    def __init__(self, materialize: _Materializer) -> None:
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self._materialize = materialize

    def resolve_data(self, write_item):
        obj = self.lookup_object(write_item.index)
        if isinstance(obj, torch.Tensor) and obj.is_meta:
            obj = self._materialize(obj)
        return self.transform_object(write_item, obj)


class _StreamingWriter(dcp.FileSystemWriter):
    """One file, items written in plan order, nothing kept after it is written."""

    def write_data(self, plan, planner):
        file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        with self.fs.create_stream(self.fs.concat_path(self.path, file_name), "wb") as stream:
            for item in plan.items:
                data = planner.resolve_data(item)
                if item.type != WriteItemType.BYTE_IO and data.untyped_storage().nbytes() \
                        != data.nbytes:
                    data = data.clone()  # torch.save would write a view's whole base
                results.append(_write_item(self.transforms, stream, data, item, file_name,
                                           self.serialization_format))
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(results)
        return future


class _StreamingSave(SaveShardedStrategy):
    """Megatron 'torch_dist' v1 save strategy built on `_LazyPlanner` + `_StreamingWriter`."""

    def __init__(self, materialize: _Materializer) -> None:
        super().__init__("torch_dist", 1)
        self._materialize = materialize

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        grouped, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state = mcore_to_pyt_state_dict(grouped, False)
        dcp.save(pyt_state, storage_writer=_StreamingWriter(str(checkpoint_dir),
                                                            single_file_per_rank=True,
                                                            thread_count=1),
                 planner=_LazyPlanner(self._materialize))

    def can_handle_sharded_objects(self) -> bool:
        return True


def _meta_model(arch: ArchConfig, precision: str, vocab_tp: int):
    if not init.is_initialized():
        init.initialize(ParallelConfig())
    if dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in a single process")
    return build_model(arch, ParallelConfig(), precision=PrecisionConfig(dtype=precision),
                       meta=True, vocab_tp=vocab_tp)


def _source_precision(reader: HFReader) -> str:
    return precision_name(reader.dtype("model.embed_tokens.weight"))


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")


def _layout_dict(parallel: ParallelConfig) -> dict:
    return {"tp": parallel.tp, "pp": parallel.pp, "ep": parallel.ep, "etp": parallel.expert_tp,
            "cp": parallel.cp}
