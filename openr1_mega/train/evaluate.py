"""Held-out accuracy during training, from the live vLLM engine (no export round trip).

Greedy decoding (one completion per problem) scored by the accuracy reward; rank 0
generates and scores, every rank receives the number.
"""

from __future__ import annotations

import torch.distributed as dist

from openr1_mega.rl.rollout import SamplingConfig


def accuracy_on(ctx, engine, rows: list[dict], r, recipe) -> float:
    """Fraction of `rows` whose greedy completion the accuracy reward accepts."""
    from openr1_mega.rl.rewards import get_reward

    result = [float("nan")]
    if ctx.is_rank0 and rows:
        greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=r.max_tokens,
                                stop=tuple(r.stop))
        completions = engine.generate([row["prompt_ids"] for row in rows], greedy)
        reward = get_reward("accuracy")
        scores = reward([c.text for c in completions],
                        answer=[row[recipe.data.answer_field] for row in rows])
        result = [sum(s or 0.0 for s in scores) / len(rows)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]
