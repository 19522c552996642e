"""Teacher trace generation: n samples per problem from an HF model with vLLM, written as a
resumable, sharded HF dataset.

    python -m openr1_mega.distill generate --teacher <hf dir> --dataset <jsonl|parquet|hub> \\
        --output <dir> [--n 4] [--shard-size 64] [--max-new-tokens 32768]

Algorithm:
  1. problems = rows of the dataset (fields mapped to id / problem / answer), first --limit;
  2. chunk k = problems[k*S : (k+1)*S] (S = --shard-size): fixed by the input order, so a
     restart cuts the same chunks; shards already on disk are skipped (distill/shards.py);
  3. per pending chunk: prompts = chat template(system?, user = template with {problem});
     a problem whose prompt leaves no room in the teacher's max_model_len is skipped (its id
     goes into the shard's metadata, and the manifest counts it: `skipped_problems`); then
     engine.generate(prompts, n, temperature, top_p, max_tokens, seed, step=k): each prompt's
     seed derives from (seed, k, position in chunk), so a regenerated chunk samples as the
     lost one would have; one row per completion with `messages` (prompt + assistant
     completion), problem id, sample index, raw completion, finish reason, token counts;
  4. the chunk's shard is written atomically, then the manifest.
A restart with the same arguments finishes the run: every (problem, sample) once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from openr1_mega.data.prompts import BadRows, row_problem
from openr1_mega.distill.shards import ShardStore
from openr1_mega.eval.run import clamp_max_tokens, engine_max_len, prompt_ids, too_long
from openr1_mega.eval.sources import read_rows, sha256_rows
from openr1_mega.eval.tasks import MATH_INSTRUCTION

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{problem}\n" + MATH_INSTRUCTION


@dataclass(frozen=True)
class EngineSettings:
    """How the teacher's vLLM engine is started (see rl.rollout.EngineConfig)."""

    dtype: str = "auto"
    kv_cache_bytes: int = 2**30
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None


@dataclass(frozen=True)
class GenerateConfig:
    """One distillation run: teacher, problems, prompt, sampling and sharding."""

    teacher: str
    """HF model directory (or hub name) of the teacher."""
    dataset: str
    """Problems: a local .jsonl/.json/.parquet file or directory, or a hub dataset name."""
    output_dir: str
    split: str = "train"
    dataset_config: str | None = None
    id_field: str = "id"
    """Problem id field; rows without it get their index as id."""
    problem_field: str = "problem"
    answer_field: str = "answer"
    prompt_template: str = DEFAULT_TEMPLATE
    """User message; `{problem}` is replaced by the problem text."""
    system_prompt: str | None = None
    n: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    seed: int = 0
    shard_size: int = 64
    """Problems per shard: the unit of work that a kill can lose."""
    limit: int | None = None
    engine: EngineSettings = field(default_factory=EngineSettings)

    def __post_init__(self):
        if "{problem}" not in self.prompt_template:
            raise ValueError("prompt_template must contain the {problem} placeholder")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")

    def content_settings(self, problems_sha256: str) -> dict[str, Any]:
        """What decides the output's content: a restart must match it exactly."""
        out = {k: v for k, v in asdict(self).items() if k not in ("output_dir", "engine")}
        out["problems_sha256"] = problems_sha256
        return out


def load_problems(config: GenerateConfig) -> list[dict[str, Any]]:
    """Rows mapped to {id, problem, answer}; ids must be unique. A row whose problem is
    missing, empty or not text is skipped (counted, the first few logged once)."""
    rows = read_rows(config.dataset, split=config.split, config=config.dataset_config)
    problems, seen, bad = [], set(), BadRows(config.dataset)
    for i, row in enumerate(rows[:config.limit]):
        problem = row_problem(row, (config.problem_field,))
        if problem is not None:
            bad.add(f"row {i}", problem)
            continue
        pid = str(row.get(config.id_field, i))
        if pid in seen:
            raise ValueError(f"dataset has duplicate problem id {pid!r} (field {config.id_field})")
        seen.add(pid)
        answer = row.get(config.answer_field)
        problems.append({"id": pid, "problem": str(row[config.problem_field]),
                         "answer": None if answer is None else str(answer)})
    bad.log(len(rows[:config.limit]))
    if not problems:
        raise ValueError(f"dataset {config.dataset} has no usable rows")
    return problems


def prompt_messages(config: GenerateConfig, problem: str) -> list[dict[str, str]]:
    """System prompt (optional) + user message built from the template."""
    user = config.prompt_template.replace("{problem}", problem)
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    return system + [{"role": "user", "content": user}]


def generate_chunk(engine: Any, tokenizer: Any, config: GenerateConfig,
                   chunk: list[dict[str, Any]], step: int
                   ) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """All rows (n per problem) of one chunk, grouped by problem, samples in order, and
    {"too_long": [problem id]}: the problems whose prompt does not fit the teacher's context
    (skipped, so one over-long problem cannot stop a run over 100k)."""
    from openr1_mega.rl.types import SamplingConfig

    messages = [prompt_messages(config, p["problem"]) for p in chunk]
    prompts = [prompt_ids(tokenizer, m) for m in messages]
    max_len = engine_max_len(engine)
    unfit = too_long(prompts, [p["id"] for p in chunk], max_len)
    if unfit:
        logger.warning("shard %d: %d problem(s) do not fit max_model_len=%d and are skipped: %s",
                       step, len(unfit), max_len, ", ".join(f"{i} ({n} tokens)" for i, n in unfit))
    skipped = {"too_long": [i for i, _ in unfit]} if unfit else {}
    keep = [k for k, p in enumerate(prompts) if len(p) < max_len]
    if not keep:
        return [], skipped
    max_tokens = clamp_max_tokens(config.max_new_tokens, max_len, [prompts[k] for k in keep],
                                  [chunk[k]["id"] for k in keep])
    sampling = SamplingConfig(n=config.n, temperature=config.temperature, top_p=config.top_p,
                              max_tokens=max_tokens, seed=config.seed)
    # indices keep each problem's seed (seed, shard, position) whatever was skipped before it
    outputs = engine.generate([prompts[k] for k in keep], sampling, step=step, indices=keep)
    return _rows(config, chunk, messages, outputs), skipped


def _rows(config: GenerateConfig, chunk: list[dict[str, Any]], messages: list[list[dict]],
          outputs: list[Any]) -> list[dict[str, Any]]:
    """One row per completion: the prompt messages + the assistant's answer, and counts."""
    counts = [0] * len(chunk)
    rows = []
    for out in outputs:
        i = out.prompt_index
        rows.append({"problem_id": chunk[i]["id"], "sample_index": counts[i],
                     "problem": chunk[i]["problem"], "answer": chunk[i]["answer"],
                     "messages": messages[i] + [{"role": "assistant", "content": out.text}],
                     "completion": out.text, "finish_reason": out.finish_reason,
                     "prompt_tokens": len(out.prompt_ids),
                     "completion_tokens": len(out.completion_ids)})
        counts[i] += 1
    return rows


def start_teacher(config: GenerateConfig) -> tuple[Any, Any]:
    """The teacher's in-process vLLM engine and its tokenizer."""
    from openr1_mega.checkpoint.model_dir import load_tokenizer
    from openr1_mega.rl.rollout import EngineConfig, RolloutEngine

    tokenizer = load_tokenizer(config.teacher)  # names a missing or broken file before vLLM
    e = config.engine
    engine = RolloutEngine(config.teacher, EngineConfig(
        dtype=e.dtype, kv_cache_bytes=e.kv_cache_bytes,
        gpu_memory_utilization=e.gpu_memory_utilization, max_model_len=e.max_model_len,
        seed=config.seed, sleep_between_rollouts=False))
    return engine, tokenizer


def generate_traces(config: GenerateConfig,
                    on_shard: Callable[[int, Path], None] | None = None) -> dict[str, Any]:
    """Run (or finish) a distillation run; returns the final manifest.

    Args:
        config: the run.
        on_shard: called with (shard index, path) after each shard is on disk.
    """
    problems = load_problems(config)
    chunks = [problems[i:i + config.shard_size]
              for i in range(0, len(problems), config.shard_size)]
    store = ShardStore(config.output_dir, len(chunks),
                       config.content_settings(sha256_rows(problems)))
    done = store.done()
    for index in sorted(done):
        _check_shard(store, index, chunks[index], config.n)
    pending = [k for k in range(len(chunks)) if k not in done]
    logger.info("%d problems in %d shards: %d done, %d to generate", len(problems),
                len(chunks), len(done), len(pending))
    if pending:
        engine, tokenizer = start_teacher(config)
        for index in pending:
            rows, skipped = generate_chunk(engine, tokenizer, config, chunks[index], step=index)
            path = store.write(index, rows, skipped)
            if on_shard is not None:
                on_shard(index, path)
            store.update_manifest()
            logger.info("shard %d/%d written: %s", index + 1, len(chunks), path.name)
    return store.update_manifest()


def _check_shard(store: ShardStore, index: int, chunk: list[dict[str, Any]], n: int) -> None:
    """A shard on disk must hold exactly its chunk's problems (less the skipped ones, which
    must be the chunk's), n samples each."""
    skipped = {pid for ids in store.skipped(index).values() for pid in ids}
    ids = {p["id"] for p in chunk}
    expected = sorted(p["id"] for p in chunk if p["id"] not in skipped for _ in range(n))
    found = sorted(store.read_column(index, "problem_id"))
    if found != expected or not skipped <= ids:
        raise ValueError(f"{store.shard_path(index)} does not hold chunk {index}'s "
                         f"{len(chunk)} problems x {n} samples; was the input changed?")
