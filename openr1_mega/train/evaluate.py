"""Held-out accuracy during training, from the live vLLM engines (no export round trip).

Greedy decoding (one completion per problem), split over the ranks' engines, scored on
rank 0 by the accuracy reward; every rank receives the number.
"""

from __future__ import annotations

import torch.distributed as dist

from openr1_mega.rl.rollout import SamplingConfig
from openr1_mega.train.policy import generate_shared


def accuracy_on(ctx, engine, rows: list[dict], r, recipe) -> float:
    """Fraction of `rows` whose greedy completion the accuracy reward accepts."""
    from openr1_mega.rl.rewards import get_reward

    if not rows:
        return float("nan")
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=r.max_tokens, stop=tuple(r.stop))
    completions = generate_shared(engine, [row["prompt_ids"] for row in rows], greedy)
    result = [None]
    if ctx.is_rank0:
        scores = get_reward("accuracy")([c.text for c in completions],
                                        answer=[row[recipe.data.answer_field] for row in rows])
        result = [sum(s or 0.0 for s in scores) / len(rows)]
    dist.broadcast_object_list(result, src=0)
    return result[0]
