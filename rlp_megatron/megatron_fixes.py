"""Narrow fixes for Megatron-Core bugs that break exact resume; installed by `rlp_megatron.train`.

Megatron's ``DistributedOptimizer`` wraps plain ``torch.optim.Adam/AdamW`` whenever neither apex nor
Transformer Engine provides a fused Adam ("Falling back to Torch optimizers"): on our CPU backend,
and on any GPU install without them. megatron-core 0.19.x has three resume bugs on that path:

1. ``state_dict()`` before the first optimizer step (e.g. the checkpoint loader builds a template
   state dict) asserts ``len(steps) == 1``: torch Adam allocates its state lazily, so there are no
   steps yet. Fix: allocate the Adam state eagerly (``step=0``, zero moments), which is exactly what
   torch's lazy initialisation would create at the first step.
2. ``load_state_dict()`` assigns *one* ``step`` tensor object to every parameter's state. Torch Adam
   increments each parameter's ``step`` in place, so the shared tensor advances once per parameter
   per iteration (5 → 33 → 61 with 28 parameters) and bias correction is silently wrong after a
   resume. Fix: give every parameter its own copy after loading.
3. The ``dp_reshardable`` parameter-state loader copies into the fp32 main parameters without
   ``torch.no_grad()`` ("a view of a leaf Variable that requires grad is being used in an in-place
   operation") and copies the checkpoint template's ``step`` over the real one. Fix: run
   ``_set_main_param_and_optimizer_states`` under ``no_grad`` and skip ``step`` there, as Megatron's
   other two loaders (fully reshardable, fs model space) already do.

4. ``WrappedTorchNorm`` (the norm of ``--transformer-impl local``) asserts that sequence parallelism
   is off, although nothing in it depends on the sequence layout: the only requirement is that its
   weights are marked ``sequence_parallel`` so that ``finalize_model_grads`` all-reduces their
   gradients over TP, as Megatron's fused and TE norms do. Fix: build it with the flag lowered and
   mark the parameters. (Measured: TP=2 with and without ``--sequence-parallel`` give bitwise
   equal losses for GPT and hybrid models on CPU.)

5. ``MambaMixer._decode`` hands ``_ssm_decode`` a (1, batch, d) tensor where it expects
   (batch, 1, d), so static-batching decode with batch > 1 (every RLP rollout of a hybrid model)
   advances all rows through the SSM state of row 0 — with the CUDA kernels too. Fix: see
   :func:`rlp_megatron.backends.mamba_torch._fix_static_batch_decode`; installed through
   ``mamba_torch.install()``, which also routes the Mamba kernels to PyTorch when mamba-ssm /
   causal-conv1d are missing (and keeps them when they are importable on a GPU).

Set ``RLP_MEGATRON_MEGATRON_FIXES=0`` to run without them (the tests use it to show each bug).
"""

from __future__ import annotations

import functools
import os

import torch

_INSTALLED = False


def _torch_adam_without_fused_backend() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate torch Adam/AdamW state now, identical to what its first step() would create."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if len(state) > 0:
                continue
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad", False):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _unshare_steps(optimizer: torch.optim.Optimizer) -> None:
    seen = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.detach().clone()
            seen.add(id(state["step"]))


def _allow_sequence_parallel_torch_norm() -> None:  # fix 4
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    if getattr(cls.__new__, "_rlp_sp", False):
        return
    original_new = cls.__new__

    def __new__(cls_, config, hidden_size, eps=1e-5, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls_, config, hidden_size, eps, **kwargs)
        config.sequence_parallel = False
        try:
            norm = original_new(cls_, config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = True
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    __new__._rlp_sp = True
    cls.__new__ = staticmethod(__new__)


def install() -> None:
    """Install the fixes (idempotent; the Adam ones are no-ops when apex/TE fused Adam is used)."""
    global _INSTALLED
    if _INSTALLED or os.environ.get("RLP_MEGATRON_MEGATRON_FIXES", "1") == "0":
        return
    _INSTALLED = True
    _allow_sequence_parallel_torch_norm()
    from rlp_megatron.backends import mamba_torch

    mamba_torch.install()  # fix 5 (and kernel routing where mamba-ssm is absent)
    if not _torch_adam_without_fused_backend():
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    orig_state_dict = DistributedOptimizer.state_dict
    orig_load_state_dict = DistributedOptimizer.load_state_dict
    orig_set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(orig_state_dict)
    def state_dict(self):
        _ensure_adam_state(self.optimizer)  # fix 1
        return orig_state_dict(self)

    @functools.wraps(orig_load_state_dict)
    def load_state_dict(self, state_dict):
        _ensure_adam_state(self.optimizer)  # fix 1: reuse the state instead of dummy tensors
        result = orig_load_state_dict(self, state_dict)
        _unshare_steps(self.optimizer)  # fix 2
        return result

    @functools.wraps(orig_set_states)
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        tensors = {k: v for k, v in tensors.items() if k != "step"}  # fix 3
        # The destination may hold a `step` entry; give it a value it already has.
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state.get(main_param, {}).get("step")
        if isinstance(step, torch.Tensor):
            tensors["step"] = step.detach().clone()
        with torch.no_grad():  # fix 3
            return orig_set_states(self, model_param, tensors)

    DistributedOptimizer.state_dict = state_dict
    DistributedOptimizer.load_state_dict = load_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
