"""Test isolation for the pytest process itself.

An in-process vLLM engine (tests of eval, weight sync) initialises torch.distributed in the
pytest process and never tears it down; tests that check "no process group was created"
(recipe loading, dry runs) would then see one left by an earlier module. Each module's
process groups are torn down when the module ends: vLLM's through vLLM's own clean-up (so
its exit hook finds nothing left to destroy), then any default group.
"""

import sys

import pytest
import torch.distributed as dist


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_leaks_out_of_a_module():
    yield
    if "vllm.distributed.parallel_state" in sys.modules:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    if dist.is_initialized():
        dist.destroy_process_group()
