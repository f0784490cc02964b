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


# ---------------------------------------------------------------------------------------------
# Checkpoint sidecar: iter_XXXXXXX/rlp_ema/, a megatron.core.dist_checkpointing checkpoint of φ
# with the model's own sharded layout (so it reshards across TP/PP/DP like the model does).
#
# Validity rule: the sidecar is written *before* Megatron writes the model checkpoint of the same
# iteration (whose completion moves latest_checkpointed_iteration.txt), and becomes valid only when
# rank 0 writes SIDECAR_MARKER after every rank finished. A crash at any point therefore leaves
# either no tracker update (the previous checkpoint, with its own valid sidecar, stays the latest)
# or a directory without marker, which loading refuses with an error naming the path.

SIDECAR_DIR = "rlp_ema"
SIDECAR_MARKER = "rlp_ema_complete.json"


class SidecarError(RuntimeError):
    pass


def _walk(tree, path=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _walk(v, (*path, i))
    else:
        yield path, tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def ema_sharded_state_dict(model_chunks, ema: dict[str, torch.Tensor]):
    """The model chunks' sharded state dict with every parameter replaced by its φ tensor (other
    entries such as ``_extra_state`` dropped). Returns (sharded_state_dict, {path: name})."""
    import dataclasses as dc

    from megatron.core.dist_checkpointing.mapping import ShardedBase

    by_id = {id(p): n for n, p in named_model_parameters(model_chunks)}
    by_ptr = {(p.data_ptr(), tuple(p.shape)): n for n, p in named_model_parameters(model_chunks)}
    out, names = {}, {}
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        for path, leaf in _walk(chunk.sharded_state_dict()):
            data = getattr(leaf, "data", None)
            if not isinstance(leaf, ShardedBase) or not isinstance(data, torch.Tensor):
                continue
            name = by_id.get(id(data)) or by_ptr.get((data.data_ptr(), tuple(data.shape)))
            if name is None:
                continue
            sub = out.setdefault(key, {})
            for k in path[:-1]:
                sub = sub.setdefault(k, {})
            changes = {"data": ema[name]}
            if "dtype" in {f.name for f in dc.fields(leaf)}:
                changes["dtype"] = ema[name].dtype  # φ is fp32 whatever the params' dtype (--bf16)
            sub[path[-1]] = dc.replace(leaf, **changes)
            names[(key, *path)] = name
    return out, names


def sidecar_path(iteration_dir) -> str:
    import os

    return os.path.join(str(iteration_dir), SIDECAR_DIR)


def save_sidecar(teacher: EMATeacher, iteration_dir, iteration: int, sharded_strategy=None,
                 async_save: bool = False, async_strategy: str = "mcore") -> None:
    """Write φ to ``iteration_dir/rlp_ema`` (collective over all ranks), then the marker.

    With ``async_save`` the write is scheduled on Megatron's async checkpoint queue *before* the
    main checkpoint's request, and the marker is a finalize step of it: the queue finalizes in
    order, so the marker always precedes the tracker update of the same iteration."""
    import os
    import shutil

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    path = sidecar_path(iteration_dir)
    if dist.get_rank() == 0:
        if os.path.exists(path):  # a leftover of an interrupted save of this iteration
            shutil.rmtree(path)
        os.makedirs(path)
    dist.barrier()
    sd, _ = ema_sharded_state_dict(teacher.model_chunks, teacher.ema)
    sd["rlp_ema_meta"] = {"decay": teacher.decay, "num_updates": teacher.num_updates,
                          "iteration": iteration}
    marker = {"iteration": iteration, "tensors": len(teacher.ema)}
    if async_save:
        from megatron.training.async_utils import schedule_async_save

        request = dist_checkpointing.save(sd, path, sharded_strategy=sharded_strategy,
                                          async_sharded_save=True, async_strategy=async_strategy)
        request.add_finalize_fn(lambda: _write_marker(path, marker))
        schedule_async_save(request)
        return
    dist_checkpointing.save(sd, path, sharded_strategy=sharded_strategy)
    dist.barrier()
    _write_marker(path, marker)
    dist.barrier()


def _write_marker(path, marker: dict) -> None:
    """Rank 0, after every rank's data is on disk (sync: barrier; async: finalize step)."""
    import json
    import os

    import torch.distributed as dist

    from rlp_megatron import faults

    faults.at("sidecar_written", marker["iteration"])
    if dist.get_rank() == 0:
        with open(os.path.join(path, SIDECAR_MARKER), "w") as f:
            json.dump(marker, f)
    faults.at("sidecar_marked", marker["iteration"])


def sidecar_state(iteration_dir) -> str:
    """'valid', 'missing' or 'incomplete'."""
    import os

    path = sidecar_path(iteration_dir)
    if not os.path.isdir(path):
        return "missing"
    return "valid" if os.path.exists(os.path.join(path, SIDECAR_MARKER)) else "incomplete"


def _first_cause(exc: BaseException) -> str:
    """One line for an exception; for torch's CheckpointException, the first rank's cause."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))[0]
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line[:300] + ' …' if len(line) > 300 else line}"


def load_sidecar(model_chunks, iteration_dir, decay: float) -> EMATeacher:
    """φ from ``iteration_dir/rlp_ema``, resharded to this run's layout; SidecarError naming the
    path if it is incomplete, corrupt, or does not match the model."""
    from megatron.core import dist_checkpointing

    path = sidecar_path(iteration_dir)
    state = sidecar_state(iteration_dir)
    if state != "valid":
        raise SidecarError(f"EMA teacher sidecar {path} is {state}")
    names = dict(named_model_parameters(model_chunks))
    target = {n: torch.empty(p.shape, dtype=torch.float32, device=p.device) for n, p in names.items()}
    sd, paths = ema_sharded_state_dict(model_chunks, target)
    sd["rlp_ema_meta"] = None
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = dist_checkpointing.load(sd, path)
    # dist_checkpointing raises several types for bad/mismatched data; torch's
    # CheckpointException (a damaged shard, another model's shapes) is a BaseException.
    except (Exception, CheckpointException) as exc:
        raise SidecarError(f"cannot load EMA teacher sidecar {path}: {_first_cause(exc)}") from exc
    ema = {}
    for p, name in paths.items():
        t = loaded
        for k in p:
            t = t[k]
        ema[name] = t.float()
    missing = set(names) - set(ema)
    if missing:
        raise SidecarError(f"EMA teacher sidecar {path} has no tensor for {sorted(missing)[:3]}")
    teacher = EMATeacher(model_chunks, decay, ema=ema)
    meta = loaded.get("rlp_ema_meta") or {}
    teacher.num_updates = int(meta.get("num_updates", 0))
    return teacher
