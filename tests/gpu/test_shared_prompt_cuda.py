"""Shared-prompt attention on CUDA (SDPA's CUDA kernels, masked) equals each prompt +
completion run alone, in float64 (tests/test_models_shared_prompt.py has the reference)."""

import pytest
import torch

from tests.test_models_shared_prompt import check_against_separate_sequences

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_shared_prompt_attention_on_cuda():
    check_against_separate_sequences("cuda", tol=1e-10)
