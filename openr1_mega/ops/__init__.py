"""Fused kernels of the GRPO step, as torch custom ops with pure-torch fallbacks.

- `grpo_advantage`, `grpo_advantage_stats`: group-relative advantages (+ per-token
  advantages, group statistics, zero-std group count).
- `token_logprob`, `token_logprob_entropy`: per-token log-probs (and entropies) of targets
  under softmax(logits / T), differentiable, without an fp32 [N, V] copy;
  `release_grad_cache` unmaps the buffer their CPU backward keeps for the next gradient.
- `vocab_parallel_token_logprob[_entropy]`: the same with the vocabulary split over
  tensor-parallel ranks.
- `fused_linear_token_logprob[_entropy]`: from hidden states and the output weight, chunk by
  chunk, never materialising [N, V] logits.

Importing this package loads the compiled extension `openr1_mega._C` if it was built
(`pip install --no-build-isolation -e .`); otherwise the references in `reference.py` serve,
after one warning. `kernels_available()` tells which.
"""

from openr1_mega.ops._extension import extension_loaded as kernels_available
from openr1_mega.ops.fused_linear import (
    fused_linear_token_logprob,
    fused_linear_token_logprob_entropy,
)
from openr1_mega.ops.grpo_advantage import (
    GrpoAdvantageStats,
    grpo_advantage,
    grpo_advantage_stats,
)
from openr1_mega.ops.token_logprob import (
    release_grad_cache,
    token_logprob,
    token_logprob_entropy,
)
from openr1_mega.ops.vocab_parallel import (
    vocab_parallel_token_logprob,
    vocab_parallel_token_logprob_entropy,
)

__all__ = [
    "GrpoAdvantageStats",
    "fused_linear_token_logprob",
    "fused_linear_token_logprob_entropy",
    "grpo_advantage",
    "grpo_advantage_stats",
    "kernels_available",
    "release_grad_cache",
    "token_logprob",
    "token_logprob_entropy",
    "vocab_parallel_token_logprob",
    "vocab_parallel_token_logprob_entropy",
]
