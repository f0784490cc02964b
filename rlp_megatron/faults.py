"""Fault injection for the fault matrix (``tests/test_faults.py``): test hooks, inert unless their
environment variable is set.

``RLP_MEGATRON_TEST_FAULT="ACTION@POINT:ITERATION[:RANK]"`` (several separated by commas) makes
the process of global rank RANK (default 0) act on itself when it reaches POINT in ITERATION (as
logged, 1-based):

- ACTION ``kill``: SIGKILL, so no handler, ``finally`` or atexit runs (a node lost, the OOM
  killer); ``stop``: SIGSTOP, so the rank stops participating without dying (a hung host).
- POINT ``rollout``: inside generation, after the first decode step; ``update``: inside the
  update, after the first micro-batch's forward (before its backward and the optimizer step);
  ``sidecar_written``: every rank's EMA sidecar data is on disk, its completion marker is not
  (the main checkpoint of the iteration is written or being written, not finalized);
  ``sidecar_marked``: the marker is written, Megatron's finalize of the main checkpoint (its
  metadata and the ``latest_checkpointed_iteration.txt`` tracker) has not run; ``tracked``: the
  tracker names the iteration (the save is complete).

The points are where the code that reaches them lives (``rollout/generate.py``, ``step.py``,
``teacher.py``, ``train.py``); each is one call of :func:`at`. The numerical faults (a NaN reward
or loss) have their own variables, :data:`NAN_REWARD_ENV` and :data:`NAN_LOSS_ENV`.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "RLP_MEGATRON_TEST_FAULT"
# Comma-separated iterations whose first reward is made NaN; the iteration whose loss is.
NAN_REWARD_ENV = "RLP_MEGATRON_TEST_NAN_REWARD_AT"
NAN_LOSS_ENV = "RLP_MEGATRON_TEST_NAN_LOSS_AT"

POINTS = ("rollout", "update", "sidecar_written", "sidecar_marked", "tracked")
_ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def _parse(text: str) -> list[tuple[str, str, int, int]]:
    faults = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        action, _, where = item.partition("@")
        point, iteration, *rank = where.split(":")
        if action not in _ACTIONS or point not in POINTS or len(rank) > 1:
            raise ValueError(f"{FAULT_ENV}: cannot parse {item!r} (ACTION@POINT:ITERATION[:RANK], "
                             f"ACTION in {sorted(_ACTIONS)}, POINT in {POINTS})")
        faults.append((action, point, int(iteration), int(rank[0]) if rank else 0))
    return faults


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def wants(point: str, iteration: int, any_rank: bool = False) -> bool:
    """Whether this rank (or, with ``any_rank``, some rank: a decision every rank must take
    alike) is to act at ``point`` of ``iteration``; cheap when nothing is set."""
    text = os.environ.get(FAULT_ENV)
    if not text:
        return False
    return any(p == point and i == iteration and (any_rank or r == _rank())
               for _, p, i, r in _parse(text))


def at(point: str, iteration: int) -> None:
    """Kill or stop this process here if the environment asks for it; otherwise nothing."""
    if not wants(point, iteration):
        return
    action = next(a for a, p, i, r in _parse(os.environ[FAULT_ENV])
                  if p == point and i == iteration and r == _rank())
    print(f"{FAULT_ENV}: {action} rank {_rank()} at {point} of iteration {iteration}", flush=True)
    os.kill(os.getpid(), _ACTIONS[action])


def nan_reward_at(iteration: int) -> bool:
    return str(iteration) in os.environ.get(NAN_REWARD_ENV, "").split(",")


def nan_loss_at(iteration: int) -> bool:
    return os.environ.get(NAN_LOSS_ENV) == str(iteration)
