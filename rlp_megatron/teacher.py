"""The EMA teacher φ: the no-think baseline p̄_φ(x_t | x_<t) of RLP's reward.

* Initialisation: lazily φ ← θ at the first RLP step (paper, Alg. 1 l.8–9), i.e. from whatever
  weights the run starts RLP with (fresh init, or a loaded NTP checkpoint).
* Update: φ ← τφ + (1−τ)θ after every optimizer step that was not skipped (τ =
  ``--rlp-ema-decay``, 0.999), including interleaved NTP steps of an RLP run.
* Storage: fp32, one tensor per model parameter on this rank, so φ is sharded exactly like θ
  (TP/PP shards, replicated over DP). fp32 matters: (1−τ)·Δθ is below bf16 resolution.
* Scoring: φ is copied into the model's own parameters for one forward without grad, and θ is
  restored afterwards (the same swap Megatron-RL and NeMo-RL do for their reference models), so
  every Megatron forward path — TP, PP schedule, Mamba layers — scores the teacher.
* Reading θ: with the distributed optimizer and ``--overlap-param-gather`` the updated
  parameters are all-gathered lazily in the next forward; the caller syncs them
  (:func:`rlp_megatron.train.sync_params`) before :meth:`update`.

Memory per GPU: 4 bytes × (parameters on this rank) for φ, plus a transient copy of θ in the
parameter dtype (2 bytes/param in bf16) during the teacher forward. For Nemotron-Nano-12B-v2
(12.3B parameters) at TP=8, PP=1 that is 6.2 GB + 3.1 GB transient per GPU.

Note (rlp_spec §1.4): S_EMA is constant within a group and cancels in the group-relative
advantage, so φ does not change the gradient under the paper's eq. 7; it sets the logged reward
level ``rlp/info_gain`` = S_pred − S_EMA, which is how the paper reports progress.
"""

from __future__ import annotations

import contextlib

import torch

from rlp_megatron.objective import ema_update_


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def named_model_parameters(model_chunks):
    """(name, param) over all model chunks of this rank; names are unique per chunk index."""
    for i, chunk in enumerate(model_chunks):
        for name, p in _unwrap(chunk).named_parameters():
            yield f"{i}.{name}", p


class EMATeacher:
    def __init__(self, model_chunks, decay: float, ema: dict[str, torch.Tensor] | None = None):
        self.model_chunks = model_chunks
        self.decay = float(decay)
        self.params = dict(named_model_parameters(model_chunks))
        if ema is None:
            ema = {n: p.detach().float().clone() for n, p in self.params.items()}  # φ ← θ
        missing = set(self.params) - set(ema)
        if missing:
            raise ValueError(f"EMA teacher has no tensor for {sorted(missing)[:3]}...")
        self.ema = ema
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """φ ← τφ + (1−τ)θ with the model's current parameters."""
        names = list(self.params)
        ema_update_([self.ema[n] for n in names], [self.params[n].detach() for n in names],
                    self.decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self):
        """The model's parameters hold φ inside the block and θ again after it."""
        backup = {}
        with torch.no_grad():
            for n, p in self.params.items():
                backup[n] = p.detach().clone()
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    def numel(self) -> int:
        return sum(t.numel() for t in self.ema.values())
