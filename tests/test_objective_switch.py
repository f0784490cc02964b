"""Switching objectives on one checkpoint directory; the EMA teacher in the checkpoint, resharded;
NTP/RLP interleave. Tiny GPT, CPU, torchrun. (Exact resume after faults and preemption:
tests/test_faults.py.)"""

import pytest
import torch

from harness import TINY_GPT, TRAIN_FLAGS, read_jsonl, torchrun

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
    # The in-loop evaluation every 2 iterations in every phase: one curve across the switches.
    evals = [*RLP, "--rlp-eval-interval", "2", "--rlp-eval-positions", "2"]
    _train(1, tmp_path, "--objective", "ntp", "--train-iters", "4", "--save-interval", "4",
           *evals)
    # RLP at its own learning rate, keeping the NTP run's Adam state (--override-opt-param-scheduler
    # is in BASE): Megatron alone refuses to match the optimizer's param groups when --lr changes.
    proc = _train(1, tmp_path, "--objective", "rlp", *evals, "--train-iters", "6",
                  "--lr", "1e-4", "--min-lr", "1e-4",
                  "--save-interval", "6", "--rlp-dump-rollouts", str(tmp_path / "rollouts"))
    assert "switching to RLP from the NTP checkpoint" in proc.stdout
    lines = [l for l in proc.stdout.splitlines() if " iteration " in l and "rlp/" in l]
    assert len(lines) == 2 and all("learning rate: 1.000000E-04" in l for l in lines)
    back = _train(1, tmp_path, "--objective", "ntp", "--train-iters", "8", "--save-interval", "8",
                  *evals)
    lines = [l for l in back.stdout.splitlines() if " iteration " in l and "lm loss" in l]
    assert len(lines) == 2 and all("learning rate: 1.000000E-03" in l for l in lines)
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(m["iteration"], m["objective"]) for m in metrics] == [
        (1, "ntp"), (2, "ntp"), (3, "ntp"), (4, "ntp"), (5, "rlp"), (6, "rlp"), (7, "ntp"), (8, "ntp")]
    curve = {m["iteration"]: m for m in metrics if "rlp_eval/info_gain" in m}
    assert sorted(curve) == [2, 4, 6, 8]
    for it in (2, 4, 8):  # NTP runs hold no teacher: φ is θ, the gain is θ's own
        m = curve[it]
        assert abs(m["rlp_eval/info_gain"]
                   - (m["rlp_eval/nothink_nll"] - m["rlp_eval/reasoned_nll"])) < 1e-5, m
    assert len({round(curve[it]["rlp_eval/nothink_nll"], 6) for it in curve}) == 4  # θ moves
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
def test_ema_sidecar_written_at_tp2_loads_resharded_at_tp1_and_pp2(tmp_path):
    """The sidecar written by a TP=2 run with --async-save (the kill/preemption matrix that
    resumes it at TP=2 is in tests/test_faults.py) loads into other layouts: S_EMA of the same
    contexts scored at TP=1 and at PP=2 agree."""
    run = tmp_path / "run"
    torchrun(2, ["-m", "rlp_megatron.train", *BASE, "--objective", "rlp", *RLP,
                 "--train-iters", "2", "--tensor-model-parallel-size", "2", "--async-save",
                 "--save-interval", "2", "--save", str(run / "ckpt"),
                 "--rlp-dump-rollouts", str(run / "rollouts")])
    dump = torch.load(run / "rollouts" / "iter0000002_dp0.pt")
    _pairs_from_dump(dump, tmp_path / "pairs.pt")
    it_dir = run / "ckpt" / "iter_0000002"
    s1 = _score(1, it_dir, tmp_path / "pairs.pt", "ema", tmp_path / "s1.pt")
    s3 = _score(2, it_dir, tmp_path / "pairs.pt", "ema", tmp_path / "s3.pt",
                "--pipeline-model-parallel-size", "2")
    assert torch.allclose(s1, s3, atol=1e-6, rtol=0), (s1, s3)
