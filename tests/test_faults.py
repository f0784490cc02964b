"""Faults and bad input (the fault matrix of README's "What survives what"): each case is
injected and must be survived — the relaunch resumes from the last complete checkpoint and
reproduces the uninterrupted run bitwise — or end in one clear line naming the file, flag or
directory, before any work is lost.

- In-process, on a real Megatron hybrid model and real ``dist_checkpointing`` files: the EMA
  teacher's sidecar damaged; damaged indexed datasets; a tracker naming a missing iteration.
- Multi-process (torchrun, tiny hybrid, TP=2, real async saves), faults injected through
  ``rlp_megatron.faults``: NaN rewards and losses; ranks SIGKILLed in a rollout, an update and
  at each point of a save, a rank SIGSTOPped, a preemption (one chain of launches on one
  checkpoint directory); a checkpoint filesystem that fills up or turns read-only (a tmpfs in a
  private mount namespace).

Elsewhere: a prompt file that is missing or not text (``tests/test_arguments.py``), a tokenizer
without the think tokens (``tests/test_real_data.py``, ``tests/test_data.py``).
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import rlp_megatron  # noqa: F401  (enables the CPU backend before any Megatron model code runs)
from harness import tiny_hybrid
from rlp_megatron import teacher as teacher_lib


@pytest.fixture(scope="module")
def saved(model_parallel, tmp_path_factory):
    """A sidecar of a tiny hybrid whose φ differs from θ (so a load can be told from a fresh φ)."""
    model = tiny_hybrid()
    teacher = teacher_lib.EMATeacher([model], decay=0.5)
    with torch.no_grad():
        for t in teacher.ema.values():
            t.add_(1.0)
    teacher.num_updates = 3
    root = tmp_path_factory.mktemp("sidecar")
    teacher_lib.save_sidecar(teacher, root / "iter_0000003", 3)
    return model, teacher, root


def _copy(root, tmp_path):
    import shutil

    shutil.copytree(root / "iter_0000003", tmp_path / "iter_0000003")
    return tmp_path / "iter_0000003"


def test_sidecar_round_trip(saved):
    model, teacher, root = saved
    loaded = teacher_lib.load_sidecar([model], root / "iter_0000003", decay=0.5)
    assert loaded.num_updates == 3
    for name, t in teacher.ema.items():
        assert torch.equal(loaded.ema[name], t), name


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "deleted"])
def test_a_damaged_sidecar_shard_is_one_error_naming_the_sidecar(saved, tmp_path, damage):
    model, _, root = saved
    iteration_dir = _copy(root, tmp_path)
    shards = sorted((iteration_dir / "rlp_ema").glob("*.distcp"))
    assert shards, list((iteration_dir / "rlp_ema").iterdir())
    shard = shards[0]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "zeroed":
        shard.write_bytes(bytes(shard.stat().st_size))
    else:
        shard.unlink()
    with pytest.raises(teacher_lib.SidecarError, match=r"cannot load EMA teacher sidecar .*rlp_ema"):
        try:
            teacher_lib.load_sidecar([model], iteration_dir, decay=0.5)
        except teacher_lib.SidecarError as exc:
            _one_line(exc)
            raise


def _one_line(exc):
    print(exc)
    assert "\n" not in str(exc), str(exc)[:2000]  # not torch's multi-page CheckpointException


def test_a_sidecar_without_its_marker_is_incomplete(saved, tmp_path):
    model, _, root = saved
    iteration_dir = _copy(root, tmp_path)
    (iteration_dir / "rlp_ema" / teacher_lib.SIDECAR_MARKER).unlink()
    with pytest.raises(teacher_lib.SidecarError, match=r"sidecar .*rlp_ema is incomplete"):
        teacher_lib.load_sidecar([model], iteration_dir, decay=0.5)


@pytest.mark.parametrize("other", ["hidden size 32", "one layer more"])
def test_a_sidecar_of_another_model_is_one_error_naming_the_sidecar(saved, other):
    _, _, root = saved
    model = tiny_hybrid(hidden_size=32) if other == "hidden size 32" else tiny_hybrid(
        pattern="M*-M-M")
    with pytest.raises(teacher_lib.SidecarError, match=r"EMA teacher sidecar .*rlp_ema"):
        try:
            teacher_lib.load_sidecar([model], root / "iter_0000003", decay=0.5)
        except teacher_lib.SidecarError as exc:
            _one_line(exc)
            raise


def _indexed(prefix, lengths):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for n in lengths:
        builder.add_document(np.arange(n, dtype=np.int32), [n])
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("damage", ["truncated .bin", ".idx of another corpus", "missing .bin"])
def test_a_damaged_indexed_dataset_fails_at_startup_naming_the_file(tmp_path, damage):
    """Megatron opens a truncated .bin (or a .bin with another corpus's .idx) without complaint
    and fails only when a training step reads the damaged sample ("buffer is smaller than
    requested size"), possibly hours in; the check runs where the datasets are built."""
    from rlp_megatron.data import check_indexed_dataset

    good, other = tmp_path / "good", tmp_path / "other"
    _indexed(good, [5, 7, 9])
    _indexed(other, [5, 7, 9, 11])
    check_indexed_dataset(str(good))
    bad = tmp_path / "bad"
    (tmp_path / "bad.idx").write_bytes((good.with_suffix(".idx")).read_bytes())
    data = good.with_suffix(".bin").read_bytes()
    if damage == "truncated .bin":
        (tmp_path / "bad.bin").write_bytes(data[:-8])
    elif damage == ".idx of another corpus":
        (tmp_path / "bad.idx").write_bytes((other.with_suffix(".idx")).read_bytes())
        (tmp_path / "bad.bin").write_bytes(data)
    with pytest.raises(ValueError, match=rf"{bad}\.(bin|idx)") as info:
        check_indexed_dataset(str(bad))
    _one_line(info.value)


def test_a_tracker_naming_a_missing_iteration_fails_at_startup_naming_it(tmp_path):
    """Megatron reads latest_checkpointed_iteration.txt and fails deep in its loader with a
    FileNotFoundError traceback; the job stops at argument parsing with one line instead."""
    import subprocess
    import sys

    from harness import REPO, TINY_GPT, TRAIN_FLAGS

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("5")
    (ckpt / "iter_0000003").mkdir()  # an older, complete-looking iteration is not enough
    proc = subprocess.run([sys.executable, "-m", "rlp_megatron.train", *TINY_GPT, *TRAIN_FLAGS,
                           "--train-iters", "2", "--load", str(ckpt)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rlp_megatron: --load {ckpt}: latest_checkpointed_iteration.txt "
                           f"names iteration 5, but {ckpt}/iter_0000005 does not exist"), last


@pytest.mark.slow
def test_non_finite_rewards_skip_the_step_and_too_many_in_a_row_stop_the_run(tmp_path):
    """A NaN reward injected at iterations 2 and 3 (TP=2): both steps are skipped and counted,
    neither updates θ or the EMA teacher, the run goes on; with --rlp-max-skipped 2 it stops at
    the second with one line."""
    from megatron.core import dist_checkpointing

    from harness import TINY_GPT, TRAIN_FLAGS, read_jsonl, torchrun
    from rlp_megatron.faults import NAN_REWARD_ENV

    rlp = ["--objective", "rlp", "--rlp-group-size", "4", "--rlp-thought-length", "8",
           "--rlp-context-length", "16", "--rlp-min-context", "4", "--train-iters", "4"]
    env = {NAN_REWARD_ENV: "2,3"}
    out = tmp_path / "run"
    torchrun(2, ["-m", "rlp_megatron.train", *TINY_GPT, *TRAIN_FLAGS, *rlp,
                 "--tensor-model-parallel-size", "2", "--rlp-max-skipped", "3",
                 "--save", str(out / "ckpt"), "--save-interval", "4",
                 "--rlp-metrics-file", str(out / "metrics.jsonl")], env=env)
    metrics = {m["iteration"]: m for m in read_jsonl(out / "metrics.jsonl")}
    assert sorted(metrics) == [1, 2, 3, 4]
    assert [metrics[i]["rlp/skipped_steps"] for i in (1, 2, 3, 4)] == [0, 1, 2, 2]
    assert "rlp/loss" in metrics[1] and "rlp/loss" in metrics[4]
    assert "rlp/loss" not in metrics[2] and "rlp/loss" not in metrics[3]
    common = dist_checkpointing.load_common_state_dict(str(out / "ckpt" / "iter_0000004" /
                                                           "rlp_ema"))
    assert common["rlp_ema_meta"]["num_updates"] == 2  # iterations 1 and 4 only

    proc = torchrun(1, ["-m", "rlp_megatron.train", *TINY_GPT, *TRAIN_FLAGS, *rlp,
                        "--rlp-max-skipped", "2"], env=env, check=False)
    assert proc.returncode != 0
    expected = ("rlp_megatron: 2 consecutive RLP steps had non-finite rewards "
                "(--rlp-max-skipped 2); stopping at iteration 3")
    assert expected in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_non_finite_loss_with_finite_rewards_keeps_megatrons_rerun_protocol(tmp_path):
    """A NaN update loss (finite rewards: θ's own forward diverged, which skipping a step would
    not cure) goes to Megatron's rerun state machine, as an NTP loss would: the step is re-run,
    found reproducible, the last good iteration is checkpointed (EMA sidecar included) and the job
    exits non-zero for a relaunch on other hardware. Nothing is lost."""
    from harness import TINY_GPT, TRAIN_FLAGS, torchrun
    from rlp_megatron.faults import NAN_LOSS_ENV

    rlp = ["--objective", "rlp", "--rlp-group-size", "4", "--rlp-thought-length", "8",
           "--rlp-context-length", "16", "--rlp-min-context", "4", "--train-iters", "4"]
    ckpt = tmp_path / "ckpt"
    proc = torchrun(1, ["-m", "rlp_megatron.train", *TINY_GPT, *TRAIN_FLAGS, *rlp, "--save",
                        str(ckpt), "--save-interval", "100"], env={NAN_LOSS_ENV: "2"},
                    check=False)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "found NaN in local RLP loss" in log and "Saving a checkpoint and exiting now" in log
    assert "exitcode  : 16" in log  # the rerun state machine's "relaunch to diagnose" code
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (ckpt / "iter_0000001" / "rlp_ema" / "rlp_ema_complete.json").exists()


# ---------------------------------------------------------------------------------------------
# Processes lost, hung or preempted: one chain of launches on one checkpoint directory, each
# relaunch compared with a run that was never interrupted.

_CHAIN_RLP = ["--objective", "rlp", "--rlp-group-size", "4", "--rlp-thought-length", "8",
              "--rlp-context-length", "16", "--rlp-min-context", "4"]
_TIMING = ("rlp/thoughts_per_s", "rlp/gen_tokens_per_s", "rlp/time_rollout_s",
           "rlp/time_teacher_s", "rlp/time_update_s")


def _chain_flags(run):
    from harness import TINY_HYBRID, TRAIN_FLAGS

    return [*TINY_HYBRID, *TRAIN_FLAGS, *_CHAIN_RLP, "--tensor-model-parallel-size", "2",
            "--train-iters", "8", "--save-interval", "2", "--exit-signal-handler",
            # megatron-core 0.19 turns --async-save off (a warning) without the persistent
            # worker; its default strategy needs nvidia-resiliency-ext.
            "--async-save", "--use-persistent-ckpt-worker", "--async-strategy", "mcore",
            "--save", str(run / "ckpt"), "--load", str(run / "ckpt"),
            "--rlp-metrics-file", str(run / "metrics.jsonl")]


class _Launch:
    """One torchrun launch of 2 workers; its output in a file (Megatron prints more than a pipe
    holds); the time from the injected fault to the launcher's exit."""

    def __init__(self, run, flags, *, fault=None, sigterm_after=None):
        import subprocess
        import sys
        import time
        import uuid

        import psutil

        from harness import REPO, free_port
        from rlp_megatron.faults import FAULT_ENV

        self.tag = uuid.uuid4().hex
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                    "PYTHONPATH": str(REPO), "RLP_FAULT_TEST_LAUNCH": self.tag}
        full_env.pop(FAULT_ENV, None)
        if fault:
            full_env[FAULT_ENV] = fault
        metrics = run / "metrics.jsonl"
        self.lines_before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        log = run / f"launch_{self.tag[:8]}.txt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "rlp_megatron.train", *flags]
        run.mkdir(parents=True, exist_ok=True)
        self.fault_at = None
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=sink,
                                    stderr=subprocess.STDOUT)
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:
                if self.fault_at is None and fault and f"{FAULT_ENV}: " in log.read_text():
                    self.fault_at = time.time()
                if sigterm_after and self.fault_at is None and metrics.exists() and len(
                        metrics.read_text().splitlines()) >= self.lines_before + sigterm_after:
                    self.fault_at = time.time()
                    for child in psutil.Process(proc.pid).children():
                        os.kill(child.pid, signal.SIGTERM)
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                raise AssertionError(f"launch hung: {log}")
        self.teardown_s = time.time() - self.fault_at if self.fault_at else None
        self.rc = proc.returncode
        self.log = log.read_text()
        self.new_metrics = [json.loads(l) for l in metrics.read_text().splitlines()[
            self.lines_before:]] if metrics.exists() else []
        # Helpers of a killed rank notice its death and exit within a moment (fix 10).
        deadline = time.time() + 10
        while True:
            self.leftovers = [p.pid for p in psutil.process_iter()
                              if _environ(p).get("RLP_FAULT_TEST_LAUNCH") == self.tag]
            if not self.leftovers or time.time() > deadline:
                break
            time.sleep(0.2)


def _environ(p) -> dict:
    import psutil

    try:
        return p.environ()
    except (psutil.Error, OSError):
        return {}


def _tracker(run) -> int:
    path = run / "ckpt" / "latest_checkpointed_iteration.txt"
    return int(path.read_text()) if path.exists() else 0


@pytest.mark.slow
def test_processes_killed_hung_or_preempted_resume_bitwise_from_the_last_complete_checkpoint(
        tmp_path):
    """Tiny hybrid, TP=2, --async-save every 2 iterations, 8 iterations. One checkpoint directory
    goes through a rank SIGKILLed in a rollout, in an update, and at each point of a save (after
    the tracker; sidecar written, no marker; marker written, no tracker), a rank SIGSTOPped
    (the others time out: --distributed-timeout-seconds-after-init), and a SIGTERM preemption.
    Every launch ends (non-zero after a fault, 0 after SIGTERM) within a bounded time, leaves
    no process behind, resumes from the tracker's iteration, and every iteration it logs — and
    the last checkpoint's model, optimizer and EMA tensors — equal the uninterrupted run's
    bitwise."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    reference = _Launch(whole, _chain_flags(whole))
    assert reference.rc == 0, reference.log[-3000:]
    expected = {m["iteration"]: m for m in reference.new_metrics}
    assert sorted(expected) == list(range(1, 9))

    chain = [  # (fault, the latest complete checkpoint afterwards)
        ("kill@tracked:2:0", 2),
        ("kill@rollout:3:1", 2),
        ("kill@update:3:0", 2),
        ("stop@rollout:4:1", 2),
        ("kill@sidecar_written:4:0", 2),
        ("kill@sidecar_marked:4:0", 2),
    ]
    for fault, tracker_after in chain:
        start = _tracker(part)
        extra = (["--distributed-timeout-seconds-after-init", "10"] if fault.startswith("stop")
                 else [])
        launch = _Launch(part, [*_chain_flags(part), *extra], fault=fault)
        print(f"{fault}: rc {launch.rc}, resumed from {start}, logged "
              f"{[m['iteration'] for m in launch.new_metrics]}, tracker {_tracker(part)}, "
              f"launcher exited {launch.teardown_s:.1f} s after the fault")
        assert launch.rc != 0 and launch.fault_at is not None, launch.log[-3000:]
        assert not launch.leftovers, (fault, launch.leftovers)
        _assert_same_as(expected, launch.new_metrics, first=start + 1)
        assert _tracker(part) == tracker_after, (fault, launch.log[-3000:])
        if fault.startswith("kill@sidecar"):  # the iteration's sidecar is not valid, 2 is
            state = "valid" if fault.startswith("kill@sidecar_marked") else "incomplete"
            assert teacher_lib.sidecar_state(part / "ckpt" / "iter_0000004") == state
            assert teacher_lib.sidecar_state(part / "ckpt" / "iter_0000002") == "valid"

    # Preempted (SIGTERM to the workers, as SLURM does) after the relaunch logs one iteration:
    # the signal handler saves at the end of the iteration in flight and the job exits 0.
    start = _tracker(part)
    launch = _Launch(part, _chain_flags(part), sigterm_after=1)
    stopped = _tracker(part)
    print(f"SIGTERM: rc {launch.rc}, resumed from {start}, logged "
          f"{[m['iteration'] for m in launch.new_metrics]}, tracker {stopped}")
    assert launch.rc == 0 and "exiting program after receiving SIGTERM" in launch.log
    assert start < stopped < 8 and not launch.leftovers
    assert teacher_lib.sidecar_state(part / "ckpt" / f"iter_{stopped:07d}") == "valid"
    _assert_same_as(expected, launch.new_metrics, first=start + 1)

    last = _Launch(part, _chain_flags(part))
    assert last.rc == 0 and not last.leftovers, last.log[-3000:]
    _assert_same_as(expected, last.new_metrics, first=stopped + 1)
    assert last.new_metrics[-1]["iteration"] == 8
    for sub in ("", "rlp_ema"):  # model, optimizer state, EMA teacher
        from harness import load_plain

        ta = load_plain(whole / "ckpt" / "iter_0000008" / sub)
        tb = load_plain(part / "ckpt" / "iter_0000008" / sub)
        assert ta.keys() == tb.keys() and len(ta) > 0
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (sub, k)

    # A sidecar that lost its marker is refused, naming it, unless the user restarts φ ← θ.
    sidecar = part / "ckpt" / "iter_0000008" / "rlp_ema"
    os.remove(sidecar / teacher_lib.SIDECAR_MARKER)
    more = [*_chain_flags(part), "--train-iters", "9", "--override-opt-param-scheduler"]
    refused = _Launch(part, more)
    assert refused.rc != 0 and not refused.new_metrics
    assert f"rlp_megatron: EMA teacher sidecar {sidecar} is incomplete" in refused.log
    reinit = _Launch(part, [*more, "--rlp-ema-reinit"])
    assert reinit.rc == 0 and "--rlp-ema-reinit: EMA teacher starts as φ ← θ" in reinit.log
    assert [m["iteration"] for m in reinit.new_metrics] == [9]


def _assert_same_as(expected, logged, first):
    its = [m["iteration"] for m in logged]
    assert its == list(range(first, first + len(its))), its
    for m in logged:
        for key in expected[m["iteration"]]:
            if key not in _TIMING:
                assert m[key] == expected[m["iteration"]][key], (m["iteration"], key)


# ---------------------------------------------------------------------------------------------
# Storage: the checkpoint filesystem fills up or turns read-only under a running job.

_STORAGE_SCRIPT = r"""
set -u
mount -t tmpfs -o size=24m rlp-fault-ckpt "$MNT" || { echo "cannot mount a tmpfs"; exit 97; }
wait_for() {  # FILE LINES: until FILE has LINES lines, or the launch ended
  while [ "$(cat "$1" 2>/dev/null | wc -l)" -lt "$2" ] && kill -0 "$PID" 2>/dev/null; do
    sleep 0.05; done
}
# 1: the disk fills up once iteration 2 is checkpointed; the save of iteration 4 fails.
"$@" > "$OUT/full.txt" 2>&1 & PID=$!
while [ "$(cat "$MNT/ckpt/latest_checkpointed_iteration.txt" 2>/dev/null)" != 2 ] \
      && kill -0 $PID 2>/dev/null; do sleep 0.05; done
dd if=/dev/zero of="$MNT/filler" bs=64k 2>/dev/null
wait $PID; echo $? > "$OUT/full.rc"
rm -f "$MNT/filler"
# 2: space is back; the relaunch resumes from 2; the filesystem turns read-only once it has
# logged its first iteration (3).
LINES=$(cat "$METRICS" | wc -l)
"$@" > "$OUT/ro.txt" 2>&1 & PID=$!
wait_for "$METRICS" $(( LINES + 1 ))
mount -o remount,ro "$MNT"
wait $PID; echo $? > "$OUT/ro.rc"
mount -o remount,rw "$MNT"
cp -a "$MNT/ckpt" "$OUT/ckpt"
"""


@pytest.mark.slow
def test_a_full_or_read_only_checkpoint_filesystem_stops_the_job_and_keeps_the_last_checkpoint(
        tmp_path):
    """Tiny hybrid, TP=2, --async-save every 2 iterations, checkpoints on a 24 MiB tmpfs of a
    private mount namespace (``unshare``: no root on the host needed). It fills up after
    iteration 2's checkpoint (ENOSPC in the save of iteration 4), then, after a relaunch that
    resumes from 2, it turns read-only (EROFS). Each time: the job stops, non-zero, with one
    line naming the checkpoint directory and the OS error; iteration 2 stays the latest
    checkpoint, complete (sidecar marker, metadata) and loadable."""
    import shutil
    import subprocess
    import sys

    from harness import REPO, free_port
    from rlp_megatron import teacher as teacher_lib

    if not shutil.which("unshare"):
        pytest.fail("the storage faults need util-linux's unshare (a private mount namespace)")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    metrics = out / "metrics.jsonl"
    flags = [*_chain_flags(mnt), "--train-iters", "6"]
    flags[flags.index("--rlp-metrics-file") + 1] = str(metrics)  # outside the faulty filesystem
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "rlp_megatron.train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(REPO), "MNT": str(mnt), "OUT": str(out), "METRICS": str(metrics)}
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c",
                           _STORAGE_SCRIPT, "storage-faults", *cmd], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ckpt = out / "ckpt"
    for case, errno in (("full", "No space left on device"), ("ro", "Read-only file system")):
        log = (out / f"{case}.txt").read_text()
        assert (out / f"{case}.rc").read_text().strip() != "0", log[-3000:]
        lines = [l for l in log.splitlines() if l.startswith("rlp_megatron: saving a checkpoint")]
        assert lines, log[-4000:]
        print(case, lines)
        assert str(mnt / "ckpt") in lines[0] and errno in lines[0], lines
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert teacher_lib.sidecar_state(ckpt / "iter_0000002") == "valid"
    its = [json.loads(l)["iteration"] for l in metrics.read_text().splitlines()]
    assert its[:4] == [1, 2, 3, 4] and its.count(3) == 2, its  # the relaunch resumed from 2


def test_a_save_failure_is_described_by_its_os_error_or_the_filesystem(tmp_path):
    """The errno inside torch DCP's CheckpointException (each rank's failure, their causes) is
    found and the tracker's iteration named; when the writer lost it ("Worker failure: ...
    <class 'OSError'>"), the filesystem is asked (the e2e test above: a full tmpfs); a failure
    that is not the storage's is left to its traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    from rlp_megatron import storage

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    try:
        raise OSError(28, "No space left on device")
    except OSError as e:
        cause = e
    lost = RuntimeError("Worker failure: An error is caught while starting worker 0, error: "
                        "<class 'OSError'>")
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = cause
    found = CheckpointException("save", {0: (lost, None), 1: (wrapped, None)})
    line = storage.describe_save_failure(found, tmp_path, 4)
    assert line == (f"rlp_megatron: saving a checkpoint to {tmp_path} failed (iteration 4): "
                    "[Errno 28] No space left on device; the latest complete checkpoint is "
                    "still iteration 2")
    unknown = CheckpointException("save", {0: (lost, None)})
    # tmp_path is writable and not full: not the storage's failure; the caller keeps the traceback
    assert storage.describe_save_failure(unknown, tmp_path, None) is None
    bug = CheckpointException("save", {0: (TypeError("a bug"), None)})
    assert storage.describe_save_failure(bug, tmp_path, 4) is None
