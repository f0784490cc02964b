import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process Megatron runs (seconds to a minute each)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one; "
                                       "benchmarks/gpu_check.sh runs them)")
