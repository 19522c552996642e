"""Engine groups: the torchrun world split into vLLM engines of `rollout.tp` ranks each.

Ranks [k*T, (k+1)*T) drive engine k together (vLLM's external launcher: one tensor-parallel
engine over the group's ranks, every rank of the group runs the same requests and receives
the same completions). Prompts are dealt to engines round robin, whole: a prompt's G
completions never straddle engines, so group statistics (advantages) are exact per engine.
Which engine samples which prompt does not change what is sampled: every request carries
its own seed from (run seed, step, prompt index) (rl/rollout.py), so the completions equal
those of one engine over the whole batch, on any layout, and a resumed run samples what the
uninterrupted run sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class EngineGroups:
    """This rank's place among the engines."""

    size: int
    """Ranks per engine (rollout.tp)."""
    count: int
    """Engines in the world (world size / size)."""
    index: int
    """This rank's engine."""
    rank: int
    """This rank's position inside its engine (vLLM's tensor-parallel rank)."""
    group: object | None = None
    """The torch.distributed group of this engine's ranks (None when size is 1)."""

    @classmethod
    def split(cls, size: int) -> EngineGroups:
        """Split the default process group into engines of `size` consecutive ranks.

        Collective when size > 1: every rank creates every engine's group (new_group's
        contract), and keeps its own."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() \
            else (0, 1)
        if size < 1 or world % size:
            raise ValueError(f"rollout.tp={size} must divide the world size {world} "
                             f"(engines of rollout.tp ranks each)")
        group = None
        if size > 1:
            for k in range(world // size):
                members = dist.new_group(list(range(k * size, (k + 1) * size)))
                if k == rank // size:
                    group = members
        return cls(size=size, count=world // size, index=rank // size, rank=rank % size,
                   group=group)

    def prompt_indices(self, num_prompts: int) -> list[int]:
        """The prompts this engine samples: every `count`-th from its index."""
        return list(range(self.index, num_prompts, self.count))

    def members(self) -> list[int]:
        """Global ranks of this engine's group."""
        return list(range(self.index * self.size, (self.index + 1) * self.size))
