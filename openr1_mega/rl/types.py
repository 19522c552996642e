"""The plain rollout types: how completions are sampled, what one is, what a failure is.

Kept apart from rl/rollout.py (the vLLM engine) so that the trainer side (rl/experience.py,
the loops' data exchange, tests) handles completions without importing an inference engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled for one rollout."""

    n: int = 8
    """Completions per prompt (the GRPO group size G)."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy); the trainer's log-probs must use the same value."""
    top_p: float = 1.0
    max_tokens: int = 256
    """Maximum completion length in tokens; longer completions are truncated."""
    stop: tuple[str, ...] = ()
    """Strings that end a completion (kept out of the text)."""
    seed: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)
    """Sampler log-prob of each completion token, at the sampling temperature."""

    @property
    def truncated(self) -> bool:
        """True when the completion hit max_tokens instead of ending by itself."""
        return self.finish_reason == "length"


class RolloutError(RuntimeError):
    """vLLM failed on a batch; the message describes the batch, the cause is chained."""
