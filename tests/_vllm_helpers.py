"""Shared pieces of the vLLM weight-sync tests: fixed sequences, a perturbed copy of a tiny
HF checkpoint, and transformers' fp32 log-probs of the sequences (the reference)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SEQUENCES = [[1, 329, 205, 61, 78, 90, 227, 79, 89, 227, 23, 24, 17, 29, 37, 2, 205],
             [1, 304, 378, 205, 40, 41, 42, 43, 5, 6, 7]]


def perturbed_copy(src: Path, dst: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    """A copy of the HF dir `src` at `dst` with every tensor moved by seeded noise (written
    once per `dst`); returns the copy's tensors by HF name."""
    if not dst.exists():
        shutil.copytree(src, dst)
        gen = torch.Generator().manual_seed(seed)
        for f in sorted(dst.glob("*.safetensors")):
            part = load_file(f)
            save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                       for k, v in part.items()}, f, metadata={"format": "pt"})
    return {k: v for f in sorted(dst.glob("*.safetensors")) for k, v in load_file(f).items()}


def hf_logprobs(model_dir: Path, sequences=SEQUENCES) -> list[torch.Tensor]:
    """transformers' fp32 log-prob of every token after the first (float64 softmax)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq in sequences:
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
            out.append(logp[:-1].gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].float())
    return out
