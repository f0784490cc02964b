"""rlp_megatron: RLP (Reinforcement Learning Pretraining, arXiv 2510.01265) as a Megatron-Core objective.

Importing the package enables the CPU backend when CUDA is unavailable (never when it is), so the
real Megatron-Core code paths run on a laptop or in CI over gloo.
"""

__version__ = "0.1.0"

from rlp_megatron.backends import maybe_enable_cpu_backend as _maybe_enable

_maybe_enable()
