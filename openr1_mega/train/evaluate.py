"""Held-out accuracy during training, from the live vLLM engines (no export round trip).

Two numbers, both scored by the accuracy reward (every rank receives them):
  eval/accuracy          pass@1 = mean accuracy over `grpo.eval_samples` samples per problem
                         at `grpo.eval_temperature` (open-r1/lighteval: 0.6), the R1 metric
  eval/accuracy_greedy   one greedy completion per problem
Generation is split over the engine groups like the rollouts; each rank of an engine scores
a round-robin share of its engine's completions, and the correct counts are all-reduced as
one tensor (sums of 0/1 scores: exact, whatever the layout).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from openr1_mega.rl.types import SamplingConfig


def accuracy_on(ctx, engine, rows: list[dict], r, recipe) -> dict[str, float]:
    """Held-out pass@1 (sampled) and greedy accuracy on `rows`; {} when there are none.
    Collective (default group)."""
    if not rows:
        return {}
    g = recipe.grpo
    runs = {"eval/accuracy": SamplingConfig(n=g.eval_samples, temperature=g.eval_temperature,
                                            top_p=r.top_p, max_tokens=r.max_tokens,
                                            stop=tuple(r.stop), seed=recipe.run.seed),
            "eval/accuracy_greedy": SamplingConfig(n=1, temperature=0.0, max_tokens=r.max_tokens,
                                                   stop=tuple(r.stop))}
    mine = ctx.engines.prompt_indices(len(rows))
    counts = []
    for params in runs.values():
        completions = engine.generate([rows[i]["prompt_ids"] for i in mine], params,
                                      indices=mine)
        share = completions[ctx.engines.rank::ctx.engines.size]
        counts += [_correct(share, rows, recipe.data.answer_field), len(share)]
    counts = torch.tensor(counts, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(counts)
    return {key: float(counts[2 * k] / counts[2 * k + 1]) for k, key in enumerate(runs)}


def _correct(completions, rows, answer_field: str) -> float:
    """How many of `completions` the accuracy reward accepts (None counts as wrong)."""
    if not completions:
        return 0.0
    from openr1_mega.rl.rewards import get_reward

    scores = get_reward("accuracy")([c.text for c in completions],
                                    answer=[rows[c.prompt_index][answer_field]
                                            for c in completions])
    return float(sum(s or 0.0 for s in scores))
