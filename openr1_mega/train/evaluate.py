"""Held-out accuracy during training, from the live vLLM engines (no export round trip).

Two numbers, both scored by the accuracy reward on rank 0 (every rank receives them):
  eval/accuracy          pass@1 = mean accuracy over `grpo.eval_samples` samples per problem
                         at `grpo.eval_temperature` (open-r1/lighteval: 0.6), the R1 metric
  eval/accuracy_greedy   one greedy completion per problem
Generation is split over the ranks' engines like the rollouts.
"""

from __future__ import annotations

import torch.distributed as dist

from openr1_mega.rl.types import SamplingConfig
from openr1_mega.train.policy import generate_shared


def accuracy_on(ctx, engine, rows: list[dict], r, recipe) -> dict[str, float]:
    """Held-out pass@1 (sampled) and greedy accuracy on `rows`; {} when there are none."""
    if not rows:
        return {}
    g = recipe.grpo
    sampled = SamplingConfig(n=g.eval_samples, temperature=g.eval_temperature, top_p=r.top_p,
                             max_tokens=r.max_tokens, stop=tuple(r.stop), seed=recipe.run.seed)
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=r.max_tokens, stop=tuple(r.stop))
    prompts = [row["prompt_ids"] for row in rows]
    results = {"eval/accuracy": generate_shared(engine, prompts, sampled),
               "eval/accuracy_greedy": generate_shared(engine, prompts, greedy)}
    payload = [None]
    if ctx.is_rank0:
        payload = [{k: _mean_accuracy(v, rows, recipe.data.answer_field)
                    for k, v in results.items()}]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _mean_accuracy(completions, rows, answer_field: str) -> float:
    from openr1_mega.rl.rewards import get_reward

    scores = get_reward("accuracy")([c.text for c in completions],
                                    answer=[rows[c.prompt_index][answer_field]
                                            for c in completions])
    return sum(s or 0.0 for s in scores) / len(completions)
