"""README command 1 (examples/demo/run.sh) and the paired study (examples/demo/study.sh) at a
few iterations: they run end to end, leave the table, the PNG and the phase times, and the study's
treatment and control are paired (same positions and noise) with a control that stays put."""

import json
import os
import subprocess
import sys

import pytest
import torch

from harness import REPO


def _bash(script, env, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", str(REPO / script), *env.pop("ARGS", "").split()], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_demo_and_paired_study_run_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # stdlib text instead of KJV keeps the test independent of apt; the flow is the same
    stdout = _bash("examples/demo/run.sh", {
        "OUT": str(out), "SOURCE": "stdlib", "NTP_ITERS": "6", "RLP_ITERS": "4",
        "NTP_EVAL_INTERVAL": "3", "EVAL_INTERVAL": "2", "EVAL_POSITIONS": "4", "PORT": "29571"})
    assert "before RLP" in stdout and "iter 6" in stdout and "iter 10" in stdout
    for phase in ("1. corpus", "2. NTP pretraining", "3. RLP", "4. table + plot", "total"):
        assert phase in stdout
    assert (out / "rlp_curves.png").stat().st_size > 10_000
    records = _records(out / "metrics.jsonl")
    assert [r["objective"] for r in records] == ["ntp"] * 6 + ["rlp"] * 4
    assert [r["iteration"] for r in records if "rlp_eval/info_gain" in r] == [3, 6, 8, 10]

    stdout = _bash("examples/demo/study.sh", {
        "ARGS": str(out), "SEEDS": "1", "NTP_ITERS": "6", "RLP_ITERS": "4", "EVAL_INTERVAL": "2",
        "EVAL_POSITIONS": "4", "PORT": "29573"})
    assert "treatment − control" in stdout and "\nseed1 " in stdout
    treat = {r["iteration"]: r for r in _records(out / "study/seed1_treatment/metrics.jsonl")}
    ctrl = {r["iteration"]: r for r in _records(out / "study/seed1_control/metrics.jsonl")}
    assert sorted(treat) == sorted(ctrl) == [7, 8, 9, 10]
    # iteration 7 starts from the same weights: same positions and noise give the same thoughts
    for key in ("rlp/info_gain", "rlp/s_pred", "rlp/s_ema", "rlp/thought_len"):
        assert treat[7][key] == pytest.approx(ctrl[7][key], abs=1e-6), key
    # the control (LR 1e-12) does not move: its held-out evaluation is the same every time
    assert ctrl[8]["rlp_eval/info_gain"] == pytest.approx(ctrl[10]["rlp_eval/info_gain"], abs=1e-6)
    assert ctrl[8]["rlp_eval/nothink_nll"] == pytest.approx(ctrl[10]["rlp_eval/nothink_nll"],
                                                            abs=1e-6)
    # the treatment (LR 1e-4) does, once it has updated
    assert treat[10]["rlp_eval/nothink_nll"] != pytest.approx(ctrl[10]["rlp_eval/nothink_nll"],
                                                              abs=1e-7)


def test_thoughts_table_from_a_rollout_dump(tmp_path, capsys):
    """examples/demo/thoughts.py: kinds of thought, their shares and mean rewards, exactly."""
    sys.path.insert(0, str(REPO / "examples" / "demo"))
    sys.path.insert(0, str(REPO / "tools"))
    import make_tiny_corpus
    import thoughts

    tok = make_tiny_corpus.train_tokenizer(make_tiny_corpus.documents()[:200], tmp_path, 300,
                                           think_tokens=True)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    close = sp.piece_to_id("</think>")
    dump = tmp_path / "dump"
    dump.mkdir()
    # group 0 (x_t = 7): an empty thought, a hit, another; group 1 (x_t = 9): two empty thoughts
    torch.save({"groups": [0, 0, 0, 1, 1],
                "thoughts": [[close], [7, 8, close], [5, close], [close], [close]],
                "targets": [7, 7, 7, 9, 9], "prompts": [[3, 4, 5]] * 3 + [[6, 6]] * 2,
                "rewards": torch.tensor([-0.5, 1.0, -0.1, -0.2, -0.2]),
                "advantages": torch.tensor([-1.0, 1.5, -0.5, 0.0, 0.0])},
               dump / "iter0000001_dp0.pt")
    thoughts.main([str(dump), str(tok), "--show", "0"])
    lines = {line.split("  ")[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert lines["empty"][-3:] == ["0.600", "-0.3000", "-0.3333"]
    assert lines["hit (1st token = x_t)"][-3:] == ["0.200", "1.0000", "1.5000"]
    assert lines["other"][-3:] == ["0.200", "-0.1000", "-0.5000"]
    assert lines["distinct thoughts per group: 2.00 (5 thoughts, 2 groups)"]


def test_paired_table_from_known_series():
    """examples/demo/paired.py on series with a known answer: d_i = 0.1·i, exactly linear."""
    sys.path.insert(0, str(REPO / "examples" / "demo"))
    import paired

    ctrl, treat = {}, {}
    for i in range(1, 9):
        noise = (-1) ** i * 0.5  # shared by both arms: cancels in d, not in the unpaired SE
        ctrl[i] = {"rlp/info_gain": noise}
        treat[i] = {"rlp/info_gain": noise + 0.1 * i}
        if i % 4 == 0:
            for arm, gain in ((ctrl, -0.3), (treat, -0.3 + 0.01 * i)):
                arm[i].update({"rlp_eval/info_gain": gain, "rlp_eval/thought_len": 1.0 + i / 8,
                               "rlp_eval/reasoned_nll": 4.0 - gain})
    r = paired.seed_row(treat, ctrl)
    assert r["first_q"] == pytest.approx(0.15) and r["last_q"] == pytest.approx(0.75)
    assert r["slope100"] == pytest.approx(10.0) and r["slope100_se"] == pytest.approx(0, abs=1e-9)
    assert r["last_q_se_paired"] == pytest.approx(0.05)
    assert r["last_q_se_unpaired"] > 0.5  # the shared ±0.5 noise
    assert r["eval_start"] == pytest.approx(-0.3) and r["eval_diff"] == pytest.approx(0.08)
    assert r["eval_curve"] == [0.04, 0.08] and r["nll_diff"] == pytest.approx(-0.08)
    assert r["iters"] == 8
