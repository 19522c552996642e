"""SFT: packing changes nothing but speed (same loss as one padded conversation per row),
and TP=2 gives the loss of TP=1."""

from types import SimpleNamespace

import pytest
import torch

from openr1_mega.models.tiny import write_tiny_model
from tests._dist import run_world


def _loss_both_ways(rank, world, hf_dir, tp):
    from transformers import AutoTokenizer

    from openr1_mega.checkpoint.hf import load_hf_weights
    from openr1_mega.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
    from openr1_mega.config.train import SftConfig
    from openr1_mega.data.chat import encode_conversation
    from openr1_mega.models.build import build_model
    from openr1_mega.parallel.init import initialize
    from openr1_mega.train.sft import _rows, conversations, eval_loss

    parallel = ParallelConfig(tp=tp)
    initialize(parallel, seed=0)
    model = build_model(hf_dir, parallel, precision=PrecisionConfig(dtype="fp32"),
                        model=ModelConfig(attention_backend="sdpa"))
    load_hf_weights(model, hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    config = SftConfig(num_train=24, seq_length=256)
    examples = [encode_conversation(tokenizer, m) for m in conversations(config, seed=0)]
    ctx = SimpleNamespace(model=model, ddp=model, vocab_size=len(tokenizer),
                          device=torch.device("cpu"))
    packed = _rows(examples, config, pad_id=0)
    padded = _rows(examples, SftConfig(num_train=24, seq_length=256, pack=False), pad_id=0)
    return {"packed": eval_loss(ctx, packed), "padded": eval_loss(ctx, padded),
            "rows": (len(packed), len(padded))}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("sft") / "qwen2", "qwen2")


def test_packing_gives_the_unpacked_loss(model_dir):
    result = run_world(_loss_both_ways, model_dir, 1, world_size=1)[0]
    assert result["rows"][0] < result["rows"][1]  # several conversations share a row
    assert result["packed"] == pytest.approx(result["padded"], rel=1e-5)
    assert result["packed"] > 0


def test_tp2_gives_the_tp1_loss(model_dir):
    tp1 = run_world(_loss_both_ways, model_dir, 1, world_size=1)[0]
    tp2 = run_world(_loss_both_ways, model_dir, 2, world_size=2)
    for rank in tp2:
        assert rank["packed"] == pytest.approx(tp1["packed"], rel=1e-5)
