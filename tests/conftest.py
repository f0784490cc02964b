import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from harness import free_port  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process Megatron runs (seconds to a minute each)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one; "
                                       "benchmarks/gpu_check.sh runs them)")


@pytest.fixture(scope="module")
def model_parallel():
    """Megatron's model-parallel state in this process (world size 1 over gloo), for tests that
    build Megatron models in-process."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    created = not torch.distributed.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(123)
    yield
    if created:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
