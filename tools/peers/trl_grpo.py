"""The TRL side of tools/bench_grpo_step.py: the same GRPO steps through TRL's GRPOTrainer.

Runs in the peers environment (`make bench-peers`: .venv-peers, TRL 1.16, the same CPU torch),
never in the main one. The bench writes a spec (JSON) naming the HF model directory, the
prompts of every step in order (chat-rendered text, its token ids and the gold answer), and
the recipe's settings; this script trains `steps` optimizer steps, one per rollout:

  one generation batch of prompts_per_step x G completions, trained in micro-batches of
  micro_batch_size sequences (gradient_accumulation_steps = steps_per_generation = the
  number of micro-batches, so one rollout feeds one optimizer step), num_generations = G, num_iterations = 1, shuffle_dataset = False (step k sees step k's
  prompts, each repeated G times, exactly as our loop does), beta, epsilon, epsilon_high,
  loss_type, temperature, top_p, max_completion_length and the learning rate of the recipe,
  gradient checkpointing only where the recipe recomputes (TRL's default is on);
  the reward is openr1_mega's own accuracy reward (rl/rewards imports without Megatron).

Generation: TRL's vLLM colocate mode when `vllm` imports here and the engine starts, else
TRL's transformers `generate` (the result says which, and why).

Timing, per optimizer step (a TrainerCallback and a GRPOTrainer subclass that only measures):
  rollout   `_generate_and_score_completions` less the two below (generation, tokenising,
            advantages)
  rewards   `_calculate_rewards`
  logprobs  `_get_per_token_logps_and_entropies` calls made while generating (old/ref
            log-probs; none with beta=0 and on-policy transformers generation)
  sync      0: transformers generation uses the trained model itself (under vLLM colocate
            TRL loads the weights inside generation, so they count as rollout)
  train     the rest of the step: policy forward, loss, backward, optimizer step
  other     from the previous step's end to this step's start (data loading, logging)

    .venv-peers/bin/python tools/peers/trl_grpo.py --spec spec.json
Prints one JSON line {"peer": "trl", ...} on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # openr1_mega's rewards
from openr1_mega.rl.rewards import get_reward


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that records where each step's time goes (it changes no computation)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phase_seconds: dict[str, float] = {}
        self.seq_lens: list[int] = []
        self.generated_tokens = 0
        self._generating = False

    def _add(self, phase: str, seconds: float) -> None:
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds

    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        self._generating = True
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._generating = False
        self._add("generate_and_score", time.perf_counter() - start)
        prompt = out["prompt_mask"].sum(dim=1)
        completion = out["completion_mask"].sum(dim=1)
        self.seq_lens = (prompt + completion).tolist()
        self.generated_tokens = int(completion.sum())
        return out

    def _calculate_rewards(self, *args, **kwargs):
        start = time.perf_counter()
        out = super()._calculate_rewards(*args, **kwargs)
        self._add("rewards", time.perf_counter() - start)
        return out

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        start = time.perf_counter()
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._generating:
            self._add("logprobs", time.perf_counter() - start)
        return out


class StepClock(TrainerCallback):
    """Per optimizer step: the phases of TimedGRPOTrainer, tokens and sequence lengths."""

    def __init__(self):
        self.trainer: TimedGRPOTrainer | None = None
        self.steps: list[dict] = []
        self._begin = self._last_end = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.phase_seconds = {}
        self._begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        end = time.perf_counter()
        seen = self.trainer.phase_seconds
        rewards, logprobs = seen.get("rewards", 0.0), seen.get("logprobs", 0.0)
        generate = seen.get("generate_and_score", 0.0)
        phases = {"rollout": generate - rewards - logprobs, "rewards": rewards,
                  "logprobs": logprobs, "train": end - self._begin - generate, "sync": 0.0,
                  "other": self._begin - self._last_end if self._last_end else 0.0}
        self._last_end = end
        lens = self.trainer.seq_lens
        self.steps.append({"phases": phases, "generated_tokens": self.trainer.generated_tokens,
                           "trained_tokens": int(sum(lens)), "seq_lens": lens})


def accuracy_reward(params: dict):
    """openr1_mega's accuracy reward in TRL's signature (gold answers in the `answer` column)."""
    reward = get_reward("accuracy", **params)

    def accuracy(completions: list[str], answer: list[str], **_) -> list[float | None]:
        return reward(completions, answer=answer)

    accuracy.__name__ = "accuracy"
    return accuracy


def prompt_dataset(spec: dict, tokenizer) -> Dataset:
    """The prompts in step order; fails if TRL's tokenisation would differ from ours."""
    rows = [p for step in spec["prompts"] for p in step]
    for i, row in enumerate(rows):
        ids = tokenizer(text=row["text"])["input_ids"]
        if ids != row["prompt_ids"]:
            raise ValueError(f"prompt {i}: TRL would tokenise the rendered prompt to {len(ids)} "
                             f"ids that differ from ours ({len(row['prompt_ids'])} ids)")
    return Dataset.from_list([{"prompt": r["text"], "answer": r["answer"]} for r in rows])


def generation_backend() -> tuple[bool, str]:
    """(use_vllm, why): colocated vLLM only where vllm imports in this environment."""
    if importlib.util.find_spec("vllm") is None:
        return False, "transformers generation (vllm is not installed in the peers environment)"
    return True, "vLLM colocate"


def grpo_config(spec: dict, out_dir: str, use_vllm: bool) -> GRPOConfig:
    """GRPOConfig for one optimizer step per rollout of prompts_per_step x G completions."""
    batch, micro = spec["prompts_per_step"] * spec["group_size"], spec["micro_batch_size"]
    if batch % micro:
        raise ValueError(f"micro_batch_size={micro} must divide the step's {batch} completions")
    return GRPOConfig(
        output_dir=out_dir, max_steps=spec["steps"], per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro, steps_per_generation=batch // micro,
        num_generations=spec["group_size"], num_iterations=1,
        max_completion_length=spec["max_tokens"], temperature=spec["temperature"],
        top_p=spec["top_p"], loss_type=spec["loss_type"], beta=spec["beta"],
        epsilon=spec["eps_low"], epsilon_high=spec["eps_high"],
        scale_rewards=spec["scale_rewards"],
        mask_truncated_completions=spec["mask_truncated_completions"],
        gradient_checkpointing=spec["gradient_checkpointing"], learning_rate=spec["lr"], lr_scheduler_type="constant", max_grad_norm=spec["clip_grad"],
        weight_decay=spec["weight_decay"], adam_beta1=spec["adam_beta1"],
        adam_beta2=spec["adam_beta2"], seed=spec["seed"], shuffle_dataset=False,
        use_cpu=not torch.cuda.is_available(), bf16=False, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3)


def run(spec: dict, out_dir: str) -> dict:
    """Train spec["steps"] steps; returns the per-step records and the generation backend.

    With vllm importable, TRL's colocate mode is tried first; if it fails (to start, or in
    its weight sync during the first step) the run starts over with transformers generation
    and the result says why."""
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dataset = prompt_dataset(spec, tokenizer)
    use_vllm, backend = generation_backend()
    for attempt in (True, False) if use_vllm else (False,):
        clock = StepClock()
        try:
            clock.trainer = TimedGRPOTrainer(
                model=AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32),
                processing_class=tokenizer, reward_funcs=[accuracy_reward(spec["reward_params"])],
                args=grpo_config(spec, out_dir, attempt), train_dataset=dataset,
                callbacks=[clock])
            clock.trainer.train()
            break
        except Exception as err:  # vLLM colocate does not run here: say so, fall back
            if not attempt:
                raise
            backend = (f"transformers generation (vLLM colocate failed: {type(err).__name__}: "
                       f"{str(err).splitlines()[0][:200]})")
    return {"peer": "trl", "generation": backend, "steps": clock.steps,
            "versions": _versions(), "torch_threads": torch.get_num_threads()}


def _versions() -> dict[str, str]:
    import transformers
    import trl

    return {"trl": trl.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON written by tools/bench_grpo_step.py")
    parser.add_argument("--out-dir", default=None, help="TRL's output_dir (nothing is saved)")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    out_dir = args.out_dir or str(Path(args.spec).parent / "trl")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(run(spec, out_dir)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
