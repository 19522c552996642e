"""HF weights load slice by slice: each TP rank reads only its own shard's bytes.

- `HFReader.get_slice` == safetensors' own `safe_open(...).get_slice` (the independent
  reader) for every dim of 1-D/2-D/3-D tensors in fp32 and bf16, and counts its bytes;
- `read_shard` == `shard(to_mcore(full HF tensors))` (the previous full-read path) for
  every rule of every tiny architecture, tied and untied, at TP=2, bit for bit, while
  reading half of each split tensor;
- in a real TP=2 world, `load_hf_weights` gives the same logits as transformers and each
  rank reads the replicated tensors plus about half of the split ones (the logits of every
  layout are also covered by tests/test_models_parity.py, which loads through this path).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openr1_mega.checkpoint.hf import read_shard
from openr1_mega.checkpoint.safetensors_io import HFReader
from openr1_mega.models.archs import arch_config, weight_map
from openr1_mega.models.archs.common import shard, to_mcore
from tests._dist import run_world
from tests._mcore_helpers import ARCHS, assert_logits_close, batch, hf_logits, tiny


def test_get_slice_matches_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"vec": torch.randn(11, generator=gen),
               "mat": torch.randn(7, 10, generator=gen).to(torch.bfloat16),
               "cube": torch.randn(3, 5, 6, generator=gen)}
    save_file(tensors, tmp_path / "model.safetensors")
    reader = HFReader(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as ref:
        for name, t in tensors.items():
            for dim in range(t.dim()):
                for start, stop in ((0, t.shape[dim]), (1, t.shape[dim] - 1), (2, 2)):
                    index = (slice(None),) * dim + (slice(start, stop),)
                    before = reader.bytes_read
                    got = reader.get_slice(name, dim, start, stop)
                    assert torch.equal(got, ref.get_slice(name)[index]), (name, dim, start)
                    assert reader.bytes_read - before == got.numel() * got.element_size()
    with pytest.raises(ValueError, match="outside tensor mat"):
        reader.get_slice("mat", 1, 3, 11)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [False, True])
def test_read_shard_equals_full_read_then_shard(tmp_path, arch, tied):
    hf_dir = tiny(tmp_path, arch, tied)
    config, full_reader = arch_config(hf_dir), HFReader(hf_dir)
    padded = config.padded_vocab_size(2)
    for rule in weight_map(config).rules():
        hf = [full_reader.get(n) for n in rule.hf]
        full, hf_bytes = to_mcore(rule, hf, config, padded), sum(t.nbytes for t in hf)
        read = []
        for rank in range(2):
            reader = HFReader(hf_dir)
            got = read_shard(reader, rule, config, padded, rank, 2)
            assert torch.equal(got, shard(rule, full, rank, 2)), (rule.mcore, rank)
            read.append(reader.bytes_read)
            if rule.tp_dim is not None:  # its shard only (less: the vocab's padded rows)
                assert reader.bytes_read <= got.nbytes, rule.mcore
        if rule.tp_dim is None:
            assert read == [hf_bytes, hf_bytes], rule.mcore
        else:  # every byte read once, by the rank that holds it
            assert sum(read) == hf_bytes, (rule.mcore, read)


def test_read_shard_rejects_kv_groups_that_do_not_split(tmp_path):
    hf_dir = tiny(tmp_path, "qwen2", False)
    config = arch_config(hf_dir)
    qkv = next(r for r in weight_map(config).rules() if "linear_qkv.weight" in r.mcore)
    with pytest.raises(ValueError, match="2 KV groups do not split over 4"):
        read_shard(HFReader(hf_dir), qkv, config, config.padded_vocab_size(4), 0, 4)


def _load_tp2(rank, world, hf_dir, input_ids):
    from openr1_mega.checkpoint.gather import tp_coords
    from openr1_mega.checkpoint.hf import load_hf_weights, param_index
    from openr1_mega.config import ParallelConfig, PrecisionConfig
    from openr1_mega.models.build import build_model, model_arch
    from openr1_mega.models.forward import forward_logits
    from openr1_mega.parallel.init import initialize

    initialize(ParallelConfig(tp=2))
    model = build_model(hf_dir, ParallelConfig(tp=2), precision=PrecisionConfig(dtype="fp32"))
    read = load_hf_weights(model, hf_dir)
    reader, held = HFReader(hf_dir), param_index(model)
    split = replicated = 0
    for rule in weight_map(model_arch(model)).rules():
        if rule.mcore in held:
            nbytes = sum(reader.get(n).nbytes for n in rule.hf)
            if tp_coords(rule)[1] > 1 and rule.tp_dim is not None:
                split += nbytes
            else:
                replicated += nbytes
    logits = forward_logits(model.eval(), input_ids)
    return {"read": read, "split": split, "replicated": replicated, "logits": logits.numpy()}


@pytest.mark.slow
def test_tp2_ranks_read_half_the_split_bytes_and_match_transformers(tmp_path):
    arch = "qwen3_moe"  # attention, experts and an untied vocab: every kind of split
    hf_dir, ids = tiny(tmp_path, arch, tied=False), batch()
    ranks = run_world(_load_tp2, hf_dir, ids)
    assert_logits_close(ranks[0]["logits"], hf_logits(hf_dir, ids), f"{arch} TP=2")
    for r in ranks:  # about half: the vocab's padded rows (never read) are all on rank 1
        assert 0.45 * r["split"] <= r["read"] - r["replicated"] <= 0.55 * r["split"]
    assert sum(r["read"] - r["replicated"] for r in ranks) == ranks[0]["split"]
