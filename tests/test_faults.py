"""Faults and bad input (issue "a fault matrix"): each case is injected and must end in one clear
error naming the file, before any work is lost — or be survived.

In-process cases on a real Megatron hybrid model and real ``dist_checkpointing`` files: the EMA
teacher's sidecar written by ``save_sidecar`` and then damaged. (Multi-process cases — SIGTERM,
a crash between the sidecar and its marker — live in ``tests/test_objective_switch.py``; a
prompt file that is missing or not text in ``tests/test_arguments.py``; a tokenizer without the
think tokens in ``tests/test_data.py``.)
"""

from __future__ import annotations

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
    from rlp_megatron.step import NAN_REWARD_ENV

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
    from rlp_megatron.step import NAN_LOSS_ENV

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
