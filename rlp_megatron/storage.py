"""Checkpoint storage failures, said in one line.

A save that fails on a full or read-only filesystem reaches the training loop as Megatron's
exception: synchronously an ``OSError`` naming a shard file without its directory
(``'__0_0.distcp'``); asynchronously a ``CheckpointException`` holding each rank's
``RuntimeError("Worker failure: ... error: <class 'OSError'>")``, whose errno was only logged by
the worker. :func:`describe_save_failure` finds the OS error in the exception's chain, or else
asks the filesystem itself (read-only flag, free space), and names the checkpoint directory and
the latest complete iteration, which the failed save never replaced (the tracker moves only in
the save's finalize step). Any other failure of a save keeps its traceback.
"""

from __future__ import annotations

import errno
import os

FULL_BYTES = 1 << 20  # a filesystem with less than this free is reported as full


def _chain(exc: BaseException):
    """The exception, its causes and contexts, and the per-rank failures of a torch DCP
    ``CheckpointException``, depth first, each once."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                stack.append(failure[0] if isinstance(failure, tuple) else failure)
        stack += [e.__cause__, e.__context__]


def _filesystem_state(directory) -> str | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return f"[Errno {errno.EROFS}] {os.strerror(errno.EROFS)}"
    free = st.f_bavail * st.f_frsize
    if free < FULL_BYTES:
        return f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} ({free} bytes free)"
    return None


def latest_iteration(save_dir) -> str:
    try:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")) as f:
            return f"iteration {f.read().strip()}"
    except OSError:
        return "none"


def describe_save_failure(exc: BaseException, save_dir, iteration: int | None) -> str | None:
    """One line: what failed, where, why, and which checkpoint is still the latest; None when
    the failure is not the storage's (no OS error in the chain, the filesystem looks fine): that
    is a bug, whose traceback the caller keeps."""
    reason = next((f"[Errno {e.errno}] {e.strerror}" for e in _chain(exc)
                   if isinstance(e, OSError) and e.errno), None)
    reason = reason or _filesystem_state(save_dir)
    if reason is None:
        return None
    which = f"iteration {iteration}" if iteration is not None else "asynchronous write"
    return (f"rlp_megatron: saving a checkpoint to {save_dir} failed ({which}): {reason}; "
            f"the latest complete checkpoint is still {latest_iteration(save_dir)}")
