"""launch/rlp.sbatch on a real SLURM: a one-node cluster (slurmctld, slurmd, munge) started on
this machine by tools/local_slurm.sh, which installs Debian's packages if they are missing.

If the machine cannot run SLURM the fixture fails (no skip): the launch script is what users run
on their clusters, and it is only tested here. Each job runs the tiny GPT with 2 processes on
CPU (GPUS_PER_NODE=2, --gpus-per-node=0 overriding the script's GPU request).
"""

import os
import re
import subprocess
import time

import pytest

from harness import REPO, TINY_GPT, TRAIN_FLAGS, free_port, load_plain  # noqa: F401

RLP = ["--objective", "rlp", "--rlp-group-size", "2", "--rlp-thought-length", "8",
       "--rlp-context-length", "32", "--rlp-min-context", "4", "--ckpt-format", "torch_dist"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", "tools/local_slurm.sh", "start", str(d)], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, f"cannot start a local SLURM:\n{start.stdout}\n{start.stderr}"
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf"), "GPUS_PER_NODE": "2",
           "PYTHON": str(REPO / ".venv" / "bin" / "python"), "OMP_NUM_THREADS": "1"}
    try:
        yield d, env
    finally:
        subprocess.run(["bash", "tools/local_slurm.sh", "stop", str(d)], cwd=REPO, timeout=120)


def _sbatch(cluster, out, flags) -> str:
    d, env = cluster
    # A free port, not the script's default (20000 + job id: a fresh cluster's job ids start at 1,
    # and CI found port 20001 taken)
    env = {**env, "MASTER_PORT": str(free_port())}
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0",
                           f"--output={out}", "launch/rlp.sbatch", *TINY_GPT, *TRAIN_FLAGS,
                           *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _finished(cluster, job: str, timeout: float = 300) -> dict:
    """The job's jobcomp record (JobState, ExitCode, ...), polled every 0.5 s."""
    d, _ = cluster
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = d / "jobcomp.txt"
        for line in (path.read_text().splitlines() if path.exists() else []):
            if line.startswith(f"JobId={job} "):
                return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish within {timeout} s")


def _iterations(text: str) -> list[tuple[int, int]]:
    """(iteration, consumed samples) of each of Megatron's iteration lines."""
    return [(int(i), int(c)) for i, c in re.findall(
        r"iteration +(\d+)/ *\d+ \| consumed samples: +(\d+)", text)]


def _ema_updates(iteration_dir) -> int:
    from megatron.core.dist_checkpointing import load_common_state_dict

    return int(load_common_state_dict(str(iteration_dir / "rlp_ema"))["rlp_ema_meta"]["num_updates"])


@pytest.mark.slow
def test_sbatch_runs_a_2_process_rlp_job_that_saves_a_checkpoint_with_its_ema_sidecar(
        cluster, tmp_path):
    from rlp_megatron.teacher import sidecar_state

    job = _sbatch(cluster, tmp_path / "out.txt", [
        *RLP, "--train-iters", "2", "--save", str(tmp_path / "ckpt"), "--save-interval", "2"])
    record = _finished(cluster, job)
    text = (tmp_path / "out.txt").read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, text[-3000:])
    assert "rlp: 1 nodes × 2 GPUs" in text and "--exit-signal-handler" in text
    assert _iterations(text) == [(1, 4), (2, 8)]
    assert text.count("rlp/info_gain") == 2
    iter_dir = tmp_path / "ckpt" / "iter_0000002"
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sidecar_state(iter_dir) == "valid" and _ema_updates(iter_dir) == 2


@pytest.mark.slow
def test_a_signalled_job_saves_and_the_resubmitted_job_resumes_iteration_data_and_ema(
        cluster, tmp_path):
    d, env = cluster
    ckpt = tmp_path / "ckpt"
    common = [*RLP, "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "1000"]
    job = _sbatch(cluster, tmp_path / "out1.txt", [*common, "--train-iters", "1000"])
    deadline = time.time() + 300
    while time.time() < deadline:  # preempt once the job has logged 3 iterations
        text = (tmp_path / "out1.txt").read_text() if (tmp_path / "out1.txt").exists() else ""
        if len(_iterations(text)) >= 3:
            break
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True, timeout=30)
    record = _finished(cluster, job)
    text = (tmp_path / "out1.txt").read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, text[-3000:])
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved == _iterations(text)[-1][0] >= 3  # saved the iteration it was in, then exited
    assert f"successfully saved checkpoint from iteration {saved:7d}" in text
    assert _ema_updates(ckpt / f"iter_{saved:07d}") == saved

    # the job again, unchanged (a requeue), told to stop 2 iterations later
    job = _sbatch(cluster, tmp_path / "out2.txt", [*common, "--train-iters", "1000",
                                                   "--exit-interval", str(saved + 2)])
    record = _finished(cluster, job)
    text = (tmp_path / "out2.txt").read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, text[-3000:])
    assert "loaded EMA teacher from" in text
    # the iteration counter and the data position continue; φ carries on (its update count)
    assert _iterations(text) == [(saved + 1, 4 * (saved + 1)), (saved + 2, 4 * (saved + 2))]
    assert _ema_updates(ckpt / f"iter_{saved + 2:07d}") == saved + 2
