"""Device backends. Only :mod:`rlp_megatron.backends.cpu` knows that there may be no GPU."""

import os


def maybe_enable_cpu_backend() -> bool:
    """Enable the CPU backend when CUDA is unavailable (set RLP_MEGATRON_CPU_BACKEND=0 to opt out)."""
    if os.environ.get("RLP_MEGATRON_CPU_BACKEND", "1") == "0":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    from rlp_megatron.backends.cpu import enable_cpu_backend

    return enable_cpu_backend()
