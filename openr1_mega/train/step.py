"""One optimizer step on a Megatron-Core model, shared by SFT and GRPO.

    zero grads -> forward/backward over micro-batches (Megatron's pipeline schedule; works
    for PP = 1 and PP > 1) -> finalize grads (DP all-reduce, tied embeddings across PP,
    sequence-parallel norms) -> clip the global grad norm -> set the LR -> optimizer step

Loss scaling: callers' loss functions return a micro-batch loss already divided by the
*global* denominator (tokens or sequences of the whole step, see rl/losses.py). Megatron
divides each micro-batch loss by the number of micro-batches and DDP averages gradients
over data-parallel ranks, so `scaled_loss` multiplies both back: the summed gradient is
then exactly the full-batch gradient, whatever the micro-batch split or DP size.

Pipeline parallelism: stages exchange activations of one fixed shape per schedule run, so
under PP > 1 every micro-batch of a step has the same [rows, width] (the callers plan them
so), given to the schedule as micro_batch_size x seq_length. (Megatron's
`variable_seq_lengths` would allow varying widths, but 0.16.1 refuses it with the allgather
MoE dispatcher, the one that runs on CPU.) Forward-only passes (old/reference log-probs,
eval loss) go through the same schedule (`forward_only`). Loss metrics exist on
the last stage only: `train_step` sums them over micro-batches, then over the pipeline group
(to reach rank 0) and the data-parallel group (each rank's share was already divided by the
step's global count), so every rank logs the step's global values.

Megatron's schedules name the "cuda" device for bookkeeping tensors; on CPU they run
inside `parallel.cpu_device.cuda_as_cpu()`. Optimizer: on GPU, Megatron's distributed
optimizer (sharded Adam states). On CPU, Megatron's optimizers insist on CUDA tensor types
(gradient clipping asserts them), so `CpuAdamW` steps torch's AdamW on the fp32 gradients
that Megatron's DDP accumulates (`param.main_grad`), with the global norm computed across
model-parallel ranks the way Megatron does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from openr1_mega.config.train import OptimConfig
from openr1_mega.parallel.cpu_device import cuda_as_cpu
from openr1_mega.train.guard import step_if_finite


def wrap_ddp(model: torch.nn.Module) -> DistributedDataParallel:
    """Megatron DDP: fp32 gradient buffers and the data-parallel all-reduce."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=torch.cuda.is_available())
    wrapped = DistributedDataParallel(model.config, ddp_config, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = wrapped.no_sync
    return wrapped


def cosine_lr(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at total_steps."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(total_steps - optim.warmup_steps, 1)
    progress = min((step - optim.warmup_steps) / span, 1.0)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


class CpuAdamW:
    """AdamW over DDP's fp32 main grads, with Megatron-style global-norm clipping (CPU)."""

    def __init__(self, model: DistributedDataParallel, optim: OptimConfig):
        groups = megatron_param_groups(model, optim.weight_decay)
        self.params = [p for group in groups for p in group["params"]]  # the optimizer's order
        self.optim = optim
        self.inner = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.adam_beta1,
                                       optim.adam_beta2), eps=optim.adam_eps)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> tuple[bool, float, None]:
        """Clip and step; returns Megatron's (update_successful, grad_norm, num_zeros)."""
        for p in self.params:
            p.grad = p.main_grad.to(p.dtype)
        norm = global_grad_norm(self.params)
        if not math.isfinite(norm):  # never let NaN/inf reach the weights (train/guard.py)
            return False, norm, None
        if self.optim.clip_grad and norm > self.optim.clip_grad:
            for p in self.params:
                p.grad.mul_(self.optim.clip_grad / (norm + 1e-6))
        self.inner.step()
        return True, norm, None

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False,
                           **unused) -> dict:
        """Adam moments as ShardedTensors laid out like their parameters (resharding-safe),
        the step count as one common value; the format of Megatron's FP32Optimizer."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        if is_loading:
            self._init_state()
        state = self.inner.state_dict()
        state["state"] = {k: dict(v) for k, v in state["state"].items()}
        steps = [float(v.pop("step")) for v in state["state"].values() if "step" in v]
        optim_state_to_sharding_state(
            state, get_param_id_to_sharded_param_map(model_sharded_state_dict, self.params))
        state["state"]["common_step"] = max(steps, default=0.0)
        return state

    def load_state_dict(self, state: dict) -> None:
        step = float(state["state"].pop("common_step", 0.0))
        for param_state in state["state"].values():
            param_state["step"] = torch.tensor(step)
        self.inner.load_state_dict(state)

    def _init_state(self) -> None:
        """Zero moments for every parameter, so a checkpoint has a slot to load into."""
        for p in self.params:
            if not self.inner.state[p]:
                self.inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                           exp_avg_sq=torch.zeros_like(p))


def megatron_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Megatron-Core's parameter groups: (wd_mult, is_expert_parallel), same rule, fixed order.

    Megatron (`optimizer._get_param_groups` with `get_standard_config_overrides`) gives
    wd_mult = 0 to every bias (`*.bias`) and every 1-D parameter (norm weights), and splits
    expert-parallel parameters (`allreduce=False`) into their own groups; its
    OptimizerParamScheduler then sets weight_decay = weight_decay x wd_mult per group. Here
    the same ParamKey rule decides, and the weight decay is set once (CPU steps have no
    scheduler). All four groups always exist, in this order (empty ones too), so every rank
    has the same groups and the checkpoint's common param_groups fit every rank without an
    object collective.
    """
    from megatron.core.optimizer import (
        OptimizerConfig,
        combine_param_group_overrides,
        get_standard_config_overrides,
    )

    overrides = get_standard_config_overrides(OptimizerConfig(weight_decay=weight_decay))
    groups = {(mult, expert): [] for expert in (False, True) for mult in (1.0, 0.0)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        matched = [o for key, o in overrides.items() if key.matches(param, name)]
        mult = combine_param_group_overrides(matched).get("wd_mult", 1.0) if matched else 1.0
        groups.setdefault((float(mult), not getattr(param, "allreduce", True)), []).append(param)
    return [{"params": params, "wd_mult": mult, "is_expert_parallel": expert,
             "weight_decay": weight_decay * mult} for (mult, expert), params in groups.items()]


def global_grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """L2 norm of all gradients across TP/PP (dense) and EP (experts), each counted once."""
    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None or not (param_is_not_shared(p) and
                                  param_is_not_tensor_parallel_duplicate(p)):
            continue
        sq = p.grad.double().pow(2).sum()
        if getattr(p, "allreduce", True):
            dense += sq
        else:
            expert += sq
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(dense, group=ps.get_model_parallel_group())
        torch.distributed.all_reduce(
            expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return math.sqrt(float(dense + expert))


def build_optimizer(model: DistributedDataParallel, optim: OptimConfig):
    """Megatron's distributed optimizer on GPU; CpuAdamW on CPU."""
    if not torch.cuda.is_available():
        return CpuAdamW(model, optim)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model.config
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=config.bf16, fp16=config.fp16,
        params_dtype=config.params_dtype, use_distributed_optimizer=True), [model])
    # Megatron marks biases and norms wd_mult=0, but only its OptimizerParamScheduler applies
    # the multiplier; we set the LR ourselves (train_step), so apply it here, once.
    for group in optimizer.param_groups:
        group["weight_decay"] = optim.weight_decay * group.get("wd_mult", 1.0)
    return optimizer


def scaled_loss(loss: torch.Tensor, num_microbatches: int) -> torch.Tensor:
    """Undo Megatron's 1/num_microbatches and DDP's 1/(DP x CP) averaging (module docstring)."""
    dp_cp = ps.get_data_parallel_world_size(with_context_parallel=True)
    return loss * (num_microbatches * dp_cp)


def train_step(model: DistributedDataParallel, optimizer, micro_batches: list,
               forward_step: Callable, lr: float, metric_names: tuple[str, ...],
               shape: tuple[int, int]) -> dict[str, float]:
    """Run forward/backward over `micro_batches`, clip, and step. Returns step metrics.

    `forward_step(batch, model) -> (output, loss_func)` is Megatron's forward-step
    contract; its loss_func returns (scaled_loss(...), metrics dict of 0-d tensors) whose
    keys include `metric_names`, each already a share of the step's global value.
    `shape` is the micro-batches' (rows, width), the same for all of them under PP > 1.
    A non-finite loss or gradient on any rank skips the optimizer step on every rank
    (`update_skipped` = 1.0; see train/guard.py). Collective: every rank calls it.
    """
    model.zero_grad_buffer()
    optimizer.zero_grad()
    for group in optimizer.param_groups:
        group["lr"] = lr
    reduced = _run_schedule(model, micro_batches, forward_step, shape, forward_only=False)
    grad_norm, skipped = step_if_finite(optimizer, model.parameters(), reduced or ())
    return {"grad_norm": grad_norm, "lr": lr, "update_skipped": float(skipped),
            **step_metrics(reduced, metric_names)}


def forward_only(model: torch.nn.Module, micro_batches: list, forward_step: Callable,
                 shape: tuple[int, int]) -> list:
    """Forward passes through the pipeline schedule without gradients; returns the
    loss_func metrics dict of each micro-batch on the last stage, [] on other stages."""
    with torch.no_grad():
        return _run_schedule(model, micro_batches, forward_step, shape, forward_only=True)


def _run_schedule(model, micro_batches: list, forward_step: Callable, shape: tuple[int, int],
                  forward_only: bool) -> list:
    """Megatron's forward(/backward) schedule over the micro-batches; under PP the stages
    exchange [width / (SP ? TP : 1), rows, hidden] activations."""
    rows, width = shape
    with cuda_as_cpu():
        return get_forward_backward_func()(
            forward_step_func=lambda it, m: forward_step(next(it), m),
            data_iterator=iter(micro_batches), model=[model],
            num_microbatches=len(micro_batches), seq_length=width, micro_batch_size=rows,
            forward_only=forward_only)


def step_metrics(reduced: list[dict], names: tuple[str, ...]) -> dict[str, float]:
    """Sum each named metric over micro-batches (last stage), then over the pipeline and
    data-parallel groups: the step's global value on every rank. One host sync."""
    device = next(iter(reduced[0].values())).device if reduced else default_device()
    total = torch.zeros(len(names), dtype=torch.float64, device=device)
    for metrics in reduced:
        total += torch.stack([metrics[k].detach().double() for k in names])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    return dict(zip(names, total.tolist()))


def default_device() -> torch.device:
    """The device models live on here: the current GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def sequence_multiple(model: torch.nn.Module) -> int:
    """Micro-batch widths must be multiples of this: TP under sequence parallelism (the
    sequence is split across TP ranks) times 2 x CP under context parallelism (load-balanced
    chunks)."""
    config = model.config
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    if config.context_parallel_size > 1:
        multiple *= 2 * config.context_parallel_size
    return multiple
