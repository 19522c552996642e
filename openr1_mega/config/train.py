"""Training-side recipe sections: optimizer and schedule (shared by SFT and GRPO).

Kept beside `schema.py` (model, parallel, precision); each dataclass is one YAML section
and validates itself in `__post_init__`, naming the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConfig:
    """The `optim:` section: AdamW with warmup + cosine decay and global-norm clipping."""

    lr: float = 1e-5
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global gradient norm (across all model-parallel ranks) to this; 0 disables."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}: must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr}: must be in [0, optim.lr={self.lr}]")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad={self.clip_grad}: must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name}={getattr(self, name)}: must be in [0, 1)")
