"""Switching objectives on one checkpoint directory; the EMA teacher in the checkpoint; exact
resume after preemption; NTP/RLP interleave. Tiny GPT, CPU, torchrun."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from harness import REPO, TINY_GPT, TRAIN_FLAGS, free_port, read_jsonl, torchrun

RLP = ["--rlp-group-size", "4", "--rlp-thought-length", "16", "--rlp-context-length", "32",
       "--rlp-min-context", "4"]
BASE = [*TINY_GPT, *TRAIN_FLAGS, "--override-opt-param-scheduler"]


def _train(nproc, out, *flags, env=None, check=True):
    return torchrun(nproc, ["-m", "rlp_megatron.train", *BASE, "--save", str(out / "ckpt"),
                            "--load", str(out / "ckpt"), "--rlp-metrics-file",
                            str(out / "metrics.jsonl"), *flags], env=env, check=check)


def _score(nproc, iter_dir, pairs, which, out, *flags):
    torchrun(nproc, ["tests/workers/score_contexts.py", str(iter_dir), str(pairs), str(out), which,
                     *TINY_GPT, *TRAIN_FLAGS, "--train-iters", "1", *flags])
    return torch.load(out)


def _pairs_from_dump(dump, path):
    groups = {}
    for g, prompt, target, s_ema in zip(dump["groups"], dump["prompts"], dump["targets"],
                                         dump["s_ema"].tolist()):
        groups[g] = (prompt[:-1], target, s_ema)  # the context is the prompt without <think>
    keys = sorted(groups)
    torch.save({"contexts": [groups[g][0] for g in keys], "targets": [groups[g][1] for g in keys]},
               path)
    return torch.tensor([groups[g][2] for g in keys])


@pytest.mark.slow
def test_ntp_to_rlp_to_ntp_on_one_checkpoint_directory(tmp_path):
    _train(1, tmp_path, "--objective", "ntp", "--train-iters", "4", "--save-interval", "4")
    # RLP at its own learning rate, keeping the NTP run's Adam state (--override-opt-param-scheduler
    # is in BASE): Megatron alone refuses to match the optimizer's param groups when --lr changes.
    proc = _train(1, tmp_path, "--objective", "rlp", *RLP, "--train-iters", "6",
                  "--lr", "1e-4", "--min-lr", "1e-4",
                  "--save-interval", "6", "--rlp-dump-rollouts", str(tmp_path / "rollouts"))
    assert "switching to RLP from the NTP checkpoint" in proc.stdout
    lines = [l for l in proc.stdout.splitlines() if " iteration " in l and "rlp/" in l]
    assert len(lines) == 2 and all("learning rate: 1.000000E-04" in l for l in lines)
    back = _train(1, tmp_path, "--objective", "ntp", "--train-iters", "8", "--save-interval", "8")
    lines = [l for l in back.stdout.splitlines() if " iteration " in l and "lm loss" in l]
    assert len(lines) == 2 and all("learning rate: 1.000000E-03" in l for l in lines)
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(m["iteration"], m["objective"]) for m in metrics] == [
        (1, "ntp"), (2, "ntp"), (3, "ntp"), (4, "ntp"), (5, "rlp"), (6, "rlp"), (7, "ntp"), (8, "ntp")]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "iter_0000006" / "rlp_ema" / "rlp_ema_complete.json").exists()
    assert not (ckpt / "iter_0000004" / "rlp_ema").exists()  # NTP checkpoints carry no teacher
    assert not (ckpt / "iter_0000008" / "rlp_ema").exists()
    # At the first RLP step φ = θ of the loaded NTP checkpoint: S_EMA equals θ's own score.
    dump = torch.load(tmp_path / "rollouts" / "iter0000005_dp0.pt")
    s_ema = _pairs_from_dump(dump, tmp_path / "pairs.pt")
    s_theta = _score(1, ckpt / "iter_0000004", tmp_path / "pairs.pt", "theta", tmp_path / "s.pt")
    assert torch.allclose(s_theta, s_ema, atol=1e-6, rtol=0), (s_theta, s_ema)


@pytest.mark.slow
def test_rlp_ntp_every_2_logs_each_objective_in_its_iterations(tmp_path):
    _train(1, tmp_path, "--objective", "rlp", *RLP, "--train-iters", "4", "--rlp-ntp-every", "2",
           "--save-interval", "1000")
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["objective"] for m in metrics] == ["rlp", "ntp", "rlp", "ntp"]
    for m in metrics:
        rlp_keys = {k for k in m if k.startswith("rlp/")}
        if m["objective"] == "ntp":
            assert "lm loss" in m and not rlp_keys
        else:
            assert "lm loss" not in m and {"rlp/info_gain", "rlp/loss", "rlp/s_ema"} <= rlp_keys


@pytest.mark.slow
def test_interrupted_sidecar_save_keeps_the_last_good_checkpoint(tmp_path):
    crashed = _train(1, tmp_path, "--objective", "rlp", *RLP, "--train-iters", "4",
                     "--save-interval", "2", env={"RLP_MEGATRON_TEST_FAIL_EMA_SAVE": "4"},
                     check=False)
    assert crashed.returncode != 0
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "iter_0000004" / "rlp_ema").is_dir()  # partly written ...
    assert not (ckpt / "iter_0000004" / "rlp_ema" / "rlp_ema_complete.json").exists()  # ... not valid
    resumed = _train(1, tmp_path, "--objective", "rlp", *RLP, "--train-iters", "4",
                     "--save-interval", "1000")
    assert f"loaded EMA teacher from {ckpt / 'iter_0000002' / 'rlp_ema'}" in resumed.stdout
    its = [m["iteration"] for m in read_jsonl(tmp_path / "metrics.jsonl")]
    assert its == [1, 2, 3, 4, 3, 4]  # resumed from iteration 2

    # A sidecar without its completion marker is refused, naming the path ...
    os.remove(ckpt / "iter_0000002" / "rlp_ema" / "rlp_ema_complete.json")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    refused = _train(1, tmp_path, "--objective", "rlp", *RLP, "--train-iters", "4",
                     "--save-interval", "1000", check=False)
    assert refused.returncode != 0
    assert (f"rlp_megatron: EMA teacher sidecar {ckpt / 'iter_0000002' / 'rlp_ema'} is incomplete"
            in refused.stderr)
    # ... unless the user asks to start φ ← θ.
    ok = _train(1, tmp_path, "--objective", "rlp", *RLP, "--train-iters", "3",
                "--rlp-ema-reinit", "--save-interval", "1000")
    assert "--rlp-ema-reinit: EMA teacher starts as φ ← θ" in ok.stdout


def _run_until_sigterm(out, after_iterations, flags):
    """Start a 2-process run and SIGTERM its workers (as SLURM does) after N iterations."""
    import psutil

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "rlp_megatron.train", *BASE, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out.mkdir(parents=True, exist_ok=True)
    log = out / "stdout.txt"
    with open(log, "w") as sink:  # a file, not a pipe: Megatron prints more than a pipe buffers
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= after_iterations:
                break
            time.sleep(0.1)
        for child in psutil.Process(proc.pid).children():
            os.kill(child.pid, signal.SIGTERM)
        proc.wait(timeout=600)
    return proc.returncode, log.read_text()


@pytest.mark.slow
def test_sigterm_and_resume_reproduce_the_uninterrupted_run_bitwise(tmp_path):
    from megatron.core import dist_checkpointing

    # --async-save: the EMA sidecar goes through Megatron's async checkpoint queue too.
    flags = ["--objective", "rlp", *RLP, "--train-iters", "6", "--tensor-model-parallel-size",
             "2", "--exit-signal-handler", "--save-interval", "1000", "--async-save"]

    def run_flags(d):
        return [*flags, "--save", str(d / "ckpt"), "--load", str(d / "ckpt"),
                "--rlp-metrics-file", str(d / "metrics.jsonl"), "--rlp-dump-rollouts",
                str(d / "rollouts")]

    whole, part = tmp_path / "whole", tmp_path / "part"
    torchrun(2, ["-m", "rlp_megatron.train", *BASE, *run_flags(whole)])
    rc, stdout = _run_until_sigterm(part, 3, run_flags(part))
    assert rc == 0, stdout[-3000:]
    assert "exiting program after receiving SIGTERM" in stdout
    stopped = int((part / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped < 6
    assert (part / "ckpt" / f"iter_{stopped:07d}" / "rlp_ema" / "rlp_ema_complete.json").exists()
    torchrun(2, ["-m", "rlp_megatron.train", *BASE, *run_flags(part)])

    timing = ("rlp/thoughts_per_s", "rlp/gen_tokens_per_s", "rlp/time_rollout_s",
              "rlp/time_teacher_s", "rlp/time_update_s")
    a = {m["iteration"]: m for m in read_jsonl(whole / "metrics.jsonl")}
    b = {m["iteration"]: m for m in read_jsonl(part / "metrics.jsonl")}  # later lines win
    assert sorted(b) == list(range(1, 7))
    for it in range(1, 7):
        for key in a[it]:
            if key not in timing:
                assert a[it][key] == b[it][key], (it, key)  # bitwise: floats compare exactly
    for it in range(1, 7):
        ra = torch.load(whole / "rollouts" / f"iter{it:07d}_dp0.pt")
        rb = torch.load(part / "rollouts" / f"iter{it:07d}_dp0.pt")
        assert ra["thoughts"] == rb["thoughts"] and torch.equal(ra["advantages"], rb["advantages"])
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    for sub in ("", "rlp_ema"):
        ta = dist_checkpointing.load_plain_tensors(str(whole / "ckpt" / "iter_0000006" / sub))
        tb = dist_checkpointing.load_plain_tensors(str(part / "ckpt" / "iter_0000006" / sub))
        assert ta.keys() == tb.keys()
        tensors = [k for k in ta if isinstance(ta[k], torch.Tensor)]
        assert len(tensors) > 0
        for k in tensors:  # model, optimizer state, EMA
            assert torch.equal(ta[k], tb[k]), (sub, k)

    # The sidecar written at TP=2 reshards: scored at TP=1, TP=2 and PP=2, S_EMA is the same.
    dump = torch.load(part / "rollouts" / "iter0000006_dp0.pt")
    _pairs_from_dump(dump, tmp_path / "pairs.pt")
    it_dir = part / "ckpt" / "iter_0000006"
    s1 = _score(1, it_dir, tmp_path / "pairs.pt", "ema", tmp_path / "s1.pt")
    s2 = _score(2, it_dir, tmp_path / "pairs.pt", "ema", tmp_path / "s2.pt",
                "--tensor-model-parallel-size", "2")
    s3 = _score(2, it_dir, tmp_path / "pairs.pt", "ema", tmp_path / "s3.pt",
                "--pipeline-model-parallel-size", "2")
    assert torch.allclose(s1, s2, atol=1e-6, rtol=0), (s1, s2)
    assert torch.allclose(s1, s3, atol=1e-6, rtol=0), (s1, s3)
