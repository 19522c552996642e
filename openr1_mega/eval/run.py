"""Evaluate a task: generate n samples per problem with vLLM (or take given completions),
score them, and aggregate pass@1 / pass@k / maj@k.

Algorithm for one task:
  1. prompt of each problem = chat template(system prompt?, user prompt of the task kind,
     add_generation_prompt=True), tokenised without extra special tokens;
  2. max_tokens = min(max_new_tokens, max_model_len - longest prompt) (a warning when
     clamped: tiny models have short contexts);
  3. engine.generate(prompts, SamplingConfig(n, temperature, top_p, max_tokens, seed), step):
     each prompt gets its own seed derived from (seed, step, prompt index);
  4. score every completion (eval/scoring.py), then per problem pass@1 = mean score,
     unbiased pass@k and maj@k (eval/metrics.py), then means over problems.
`evaluate()` works on a live RolloutEngine (the GRPO loop calls it every N steps, no export
round trip); `score_completions()` scores generations made anywhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from openr1_mega.eval import metrics, scoring, tasks
from openr1_mega.eval.tasks import TaskData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One completion of one problem, with what the engine said about it (None if unknown)."""

    completion: str
    finish_reason: str | None = None
    completion_tokens: int | None = None


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def engine_max_len(engine: Any) -> int:
    """The engine's max_model_len (prompt + completion)."""
    return int(engine.llm.model_config.max_model_len)


def too_long(prompts: Sequence[Sequence[int]], ids: Sequence[str], max_len: int
             ) -> list[tuple[str, int]]:
    """(id, prompt tokens) of every prompt that leaves no room for one new token."""
    return [(i, len(p)) for i, p in zip(ids, prompts) if len(p) >= max_len]


def clamp_max_tokens(max_new_tokens: int, max_len: int, prompts: Sequence[Sequence[int]],
                     ids: Sequence[str]) -> int:
    """The largest completion budget every prompt fits: min(max_new_tokens, max_len - longest).

    Raises:
        ValueError: prompts leave no room for a single new token (all of them are named,
            with their lengths, in one message).
    """
    unfit = too_long(prompts, ids, max_len)
    if unfit:
        listed = ", ".join(f"{i!r} ({n} tokens)" for i, n in unfit)
        raise ValueError(f"{len(unfit)} of {len(prompts)} problem(s) have a prompt that does "
                         f"not fit max_model_len={max_len}: {listed}")
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    room = max_len - len(prompts[longest])
    if room < max_new_tokens:
        logger.warning("max_new_tokens %d clamped to %d: max_model_len is %d and the longest "
                       "prompt has %d tokens", max_new_tokens, room, max_len,
                       len(prompts[longest]))
    return min(max_new_tokens, room)


def generate(engine: Any, tokenizer: Any, task: TaskData, sampling: Any, *,
             system_prompt: str | None = None, step: int = 0
             ) -> tuple[dict[str, list[Sample]], Any]:
    """Sample `sampling.n` completions per problem of `task`.

    Returns:
        ({problem id: samples}, the SamplingConfig used: max_tokens clamped to the context).
    """
    ids = [row["id"] for row in task.rows]
    prompts = [prompt_ids(tokenizer, tasks.messages(task.spec.kind, row, system_prompt))
               for row in task.rows]
    max_tokens = clamp_max_tokens(sampling.max_tokens, engine_max_len(engine), prompts, ids)
    sampling = replace(sampling, max_tokens=max_tokens)
    outputs = engine.generate(prompts, sampling, step=step)
    samples: dict[str, list[Sample]] = {i: [] for i in ids}
    for out in outputs:
        samples[ids[out.prompt_index]].append(
            Sample(out.text, out.finish_reason, len(out.completion_ids)))
    return samples, sampling


def score_completions(task: TaskData, samples: Mapping[str, Sequence[Sample]], *,
                      config: scoring.ScoringConfig | None = None,
                      ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Score given samples of `task`'s problems; returns {"metrics", "problems", "dataset"}.

    Problems of the task without samples are left out (counted as `missing`); a sample
    whose id is not in the task is an error.
    """
    by_id = {row["id"]: row for row in task.rows}
    unknown = sorted(set(samples) - set(by_id))
    if unknown:
        raise ValueError(f"task {task.name}: completions for unknown problem id(s) {unknown[:5]}")
    rows = [row for row in task.rows if samples.get(row["id"])]
    if not rows:
        raise ValueError(f"task {task.name}: no completions for any of its problems")
    flat_rows = [row for row in rows for _ in samples[row["id"]]]
    flat = [s for row in rows for s in samples[row["id"]]]
    scored = scoring.score(task.spec.kind, [s.completion for s in flat], flat_rows,
                           config or scoring.ScoringConfig())
    ks = list(ks) if ks else metrics.default_ks(min(len(samples[r["id"]]) for r in rows))
    problems, start = [], 0
    for row in rows:
        count = len(samples[row["id"]])
        part = slice(start, start + count)
        start += count
        problems.append(_problem_record(task.spec.kind, row, flat[part], scored.scores[part],
                                        scored.answers[part], ks))
    return {"dataset": task.describe(), "kind": task.spec.kind,
            "metrics": _task_metrics(problems, flat, scored, len(task.rows) - len(rows)),
            "problems": problems}


def _problem_record(kind: str, row: dict[str, Any], samples: Sequence[Sample],
                    scores: Sequence[float | None], answers: Sequence[str | None],
                    ks: Sequence[int]) -> dict[str, Any]:
    values = [0.0 if s is None else float(s) for s in scores]
    gold = {"math": row.get("answer"), "choice": row.get("gold_letter")}.get(kind)
    return {"id": row["id"], "gold": gold, "scores": list(scores), "answers": list(answers),
            "finish_reasons": [s.finish_reason for s in samples],
            "completion_tokens": [s.completion_tokens for s in samples],
            "metrics": metrics.problem_metrics(values, None if kind == "code" else answers, ks)}


def _task_metrics(problems: list[dict], flat: Sequence[Sample], scored: scoring.Scored,
                  missing: int) -> dict[str, Any]:
    out: dict[str, Any] = metrics.aggregate([p["metrics"] for p in problems])
    tokens = [s.completion_tokens for s in flat if s.completion_tokens is not None]
    finished = [s.finish_reason for s in flat if s.finish_reason is not None]
    out.update(problems=len(problems), samples=len(flat), missing=missing,
               unverifiable=sum(s is None for s in scored.scores),
               truncated_fraction=(sum(r == "length" for r in finished) / len(finished)
                                   if finished else None),
               mean_completion_tokens=sum(tokens) / len(tokens) if tokens else None,
               **scored.counts)
    return out


def evaluate(engine: Any, tokenizer: Any, task: TaskData, sampling: Any, *,
             system_prompt: str | None = None, step: int = 0,
             config: scoring.ScoringConfig | None = None,
             ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Generate with a live engine and score: the entry point for evaluation during training.

    Args:
        engine: an rl.rollout.RolloutEngine (its current weights are evaluated).
        tokenizer: a transformers tokenizer with the model's chat template.
        task: from `tasks.load_task` (load once, evaluate every N steps).
        sampling: an rl.types.SamplingConfig (n, temperature, top_p, max_tokens, seed).
        system_prompt: optional system message.
        step: training step; seeds the per-prompt sampling seeds.
        config: verification workers and time limits (default ScoringConfig()).
        ks: k values for pass@k / maj@k (default: powers of two up to n).

    Returns:
        {"dataset", "kind", "metrics" (pass@1, pass@k, maj@k, ...), "problems",
         "sampling" (the settings used, max_tokens after clamping)}.
    """
    samples, used = generate(engine, tokenizer, task, sampling, system_prompt=system_prompt,
                             step=step)
    return dict(score_completions(task, samples, config=config, ks=ks), sampling=asdict(used))


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: one row per task, pass@1 (± stderr) and every other metric."""
    names = sorted({m for r in results.values() for m in r["metrics"]
                    if m.startswith(("pass@", "maj@")) and m != "pass@1_stderr"},
                   key=lambda m: (m.split("@")[0] != "pass", int(m.split("@")[1])))
    header = ["task", "problems", "n", *names]
    lines = [header]
    for task, result in results.items():
        m = result["metrics"]
        n = m["samples"] / m["problems"]
        cells = [task, str(m["problems"]), f"{n:g}"]
        for name in names:
            value = m.get(name)
            cell = "-" if value is None else f"{100 * value:.1f}"
            if name == "pass@1" and "pass@1_stderr" in m:
                cell += f" ± {100 * m['pass@1_stderr']:.1f}"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines)
