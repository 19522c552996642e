"""Shared pieces of the Megatron model / checkpoint tests.

The pytest process only writes tiny HF models and computes `transformers` references;
everything Megatron runs in processes started by `tests._dist.run_world` (the CPU
compatibility layer patches process-wide state). Results cross the process boundary as
numpy arrays (torch tensors in a multiprocessing queue need their sender alive).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ARCHS = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
TOL = 1e-4


def tiny(root: Path, arch: str, tied: bool) -> Path:
    """A tiny random `arch` model under `root` (written once per name)."""
    from openr1_mega.models.tiny import write_tiny_model

    out = root / f"{arch}{'_tied' if tied else ''}"
    if not (out / "config.json").exists():
        write_tiny_model(out, arch, tie_word_embeddings=tied, seed=len(arch) + tied)
    return out


def batch(vocab: int = 393, seed: int = 0, seq: int = 37) -> torch.Tensor:
    """[2, seq] random token ids (odd length by default)."""
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf_dir: Path, input_ids: torch.Tensor) -> np.ndarray:
    """transformers' fp32 logits: the independent reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model(input_ids).logits.numpy()


def hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF dir as saved on disk (safetensors' own reader)."""
    from safetensors.numpy import load_file

    out = {}
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_logits_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    diff = np.abs(got - want).max()
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert diff < TOL, f"{what}: max abs diff {diff:.3g} >= {TOL}"


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray],
                        what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: names differ: {set(got) ^ set(want)}"
    for name in want:
        assert got[name].dtype == want[name].dtype, f"{what}: {name} dtype"
        assert np.array_equal(got[name], want[name]), f"{what}: {name} differs"


# ---------------------------------------------------------------- inside the workers
def run_megatron(hf_dir: Path, layout: dict, input_ids: torch.Tensor,
                 source: Path | None = None, export: bool = True) -> dict:
    """Build `layout`, load weights (HF dir, or dist checkpoint `source`), return numpy
    logits (last stage, else None), the exported HF tensors (rank 0, else None), the
    checkpoint's extra_state and the model (for the worker's own use)."""
    from openr1_mega.checkpoint import dist as dist_ckpt
    from openr1_mega.checkpoint.hf import iter_hf_tensors, load_hf_weights
    from openr1_mega.config import ParallelConfig, PrecisionConfig
    from openr1_mega.models.build import build_model
    from openr1_mega.models.forward import forward_logits
    from openr1_mega.parallel.init import initialize

    parallel = ParallelConfig(**layout)
    initialize(parallel)
    model = build_model(hf_dir, parallel, precision=PrecisionConfig(dtype="fp32"))
    extra = None
    if source is None:
        load_hf_weights(model, hf_dir)
    else:
        extra = dist_ckpt.load(model, None, source)
    model.eval()
    logits = forward_logits(model, input_ids)
    tensors = {n: t.cpu().numpy().copy() for n, t in iter_hf_tensors(model)} if export else {}
    return {"logits": None if logits is None else logits.numpy(),
            "export": tensors or None, "extra": extra, "model": model}
