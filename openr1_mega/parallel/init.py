"""Process groups for TP/PP/EP/CP/DP through `megatron.core.parallel_state`.

`initialize(parallel)` is called once per process before building a model:
1. join `torch.distributed` if nobody did yet (env from torchrun, from srun through
   `parallel.launch`, or a single local rank), with NCCL on CUDA and gloo on CPU;
2. apply the CPU compatibility layer when CUDA is absent (`parallel.cpu_compat`);
3. check the layout divides the world, create Megatron's groups (order tp-cp-ep-dp-pp);
4. seed the model-parallel RNG tracker (TP ranks differ, DP replicas agree).

    torchrun --nproc_per_node 2 -m <entry>   # each rank: initialize(ParallelConfig(tp=2))
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from openr1_mega.config.schema import ParallelConfig
from openr1_mega.parallel import cpu_compat
from openr1_mega.parallel.launch import apply_launcher_env


def initialize(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Set up Megatron's process groups for `parallel` on the current process."""
    on_cpu = cpu_compat.install()
    _init_torch_distributed(on_cpu)
    world = dist.get_world_size()
    parallel.data_parallel_size(world)  # raises with the reason when the layout does not fit
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed torch and Megatron's RNG tracker (call after `initialize`)."""
    tp, ep = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
    etp = ps.get_expert_tensor_parallel_rank()
    if torch.cuda.is_available():
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        cpu_compat.seed(seed, tp, ep, etp)


def destroy() -> None:
    """Tear down Megatron's groups (the default torch.distributed group stays)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def is_initialized() -> bool:
    """Whether `initialize` has created Megatron's groups in this process."""
    return ps.model_parallel_is_initialized()


def _init_torch_distributed(on_cpu: bool) -> None:
    if dist.is_initialized():
        return
    backend = "gloo" if on_cpu else "nccl"
    apply_launcher_env()  # srun without torchrun: RANK/WORLD_SIZE/... from Slurm's variables
    if "RANK" not in os.environ:  # a lone process: a world of one on localhost
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    if not on_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
