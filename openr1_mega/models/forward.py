"""Full-vocabulary logits of a (TP/PP/EP-sharded) model for one batch, without grad.

Runs Megatron's own pipeline schedule (forward only), so a PP>1 model passes activations
between stages exactly as in training. Used by the conversion parity checks; trainers
compute their log-probs in their own forward step.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from openr1_mega.models.build import model_arch
from openr1_mega.parallel.cpu_device import cuda_as_cpu


@torch.no_grad()
def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor | None:
    """input_ids [b, s] -> logits [b, s, vocab_size] (fp32, real vocab only, TP-gathered).

    Every rank of the model-parallel group calls this with the same `input_ids`; the last
    pipeline stage returns the logits, the other stages return None. Positions are
    0..s-1 and attention is causal (no padding mask).
    """
    arch = model_arch(model)
    batch, seq = input_ids.shape
    positions = torch.arange(seq, device=input_ids.device).expand(batch, -1)

    def step(data_iterator, chunk):
        ids = next(data_iterator)
        output = chunk(ids, positions, None)
        return output, _identity_loss

    with cuda_as_cpu():  # the schedule's bookkeeping tensors name "cuda"
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([input_ids]), model=[model],
            num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True,
            collect_non_loss_data=True)
    if not ps.is_pipeline_last_stage():
        return None
    logits = gather_from_tensor_model_parallel_region(out[0])
    return logits[..., : arch.vocab_size].float()


def _identity_loss(output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
    return output
