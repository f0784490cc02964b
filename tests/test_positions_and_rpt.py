"""Where to think, and against what: position selection (--rlp-positions, K per window), the RPT
objective (--objective rpt) and the NTP term (--rlp-ntp-weight), on the real Megatron step.

Four short runs of the tiny GPT (mock data, CPU/gloo):
* ``rpt_tp1`` / ``rpt_tp2``: RPT predicting 2 tokens, entropy-selected positions, K = 2 per
  window, a vocabulary of 8 tokens (so that a random model's predictions match the text often
  enough to give the advantages something to rank); TP = 2 runs Megatron's output layer
  (``--rlp-logprobs logits``), TP = 1 the fused kernels.
* ``ntp_tp1`` / ``ntp0_tp1``: RLP with the curriculum (φ's entropies, the band from the easiest
  positions at iteration 1 to the hardest at iteration 2), K = 2, with λ = 0.5 and λ = 0;
  ``ntp_dp2``: the first at DP = 2.
The worker (tests/workers/rlp_run.py) records, before each step chooses positions, the naive
entropies of every window from Megatron's own logits (all TP shards gathered, fp64 softmax), and
the NTP term's gradient computed on its own (Megatron's forward with labels over the same windows
and loss mask, backward).
"""

import math

import numpy as np
import pytest
import torch

from harness import TINY_GPT, TRAIN_FLAGS, read_jsonl, torchrun

G, K, SEED, MIN_CONTEXT, CONTEXT = 4, 2, 1234, 4, 32
COMMON = ["--rlp-group-size", str(G), "--rlp-positions-per-doc", str(K),
          "--rlp-thought-length", "8", "--rlp-context-length", str(CONTEXT),
          "--rlp-min-context", str(MIN_CONTEXT), "--global-batch-size", "16", "--clip-grad", "0"]
RPT = ["--objective", "rpt", "--rlp-rpt-match-tokens", "2", "--rlp-positions", "entropy",
       "--rlp-entropy-top-fraction", "0.5", "--vocab-size", "8",
       "--make-vocab-size-divisible-by", "4", "--train-iters", "2"]  # 8 = padded at TP 1 and 2
CURRICULUM = ["--objective", "rlp", "--rlp-positions", "curriculum",
              "--rlp-entropy-top-fraction", "0.25", "--rlp-entropy-model", "teacher",
              "--rlp-curriculum-start", "1", "--rlp-curriculum-iters", "1",
              "--rlp-ema-decay", "0.5"]
RUNS = {
    "rpt_tp1": (1, [*RPT, "--record-positions"]),
    "rpt_tp2": (2, [*RPT, "--record-positions", "--tensor-model-parallel-size", "2",
                    "--rlp-logprobs", "logits"]),
    "ntp_tp1": (1, [*CURRICULUM, "--rlp-ntp-weight", "0.5", "--train-iters", "2",
                    "--record-positions", "--record-ntp-gradient"]),
    "ntp0_tp1": (1, [*CURRICULUM, "--rlp-ntp-weight", "0", "--train-iters", "1",
                     "--record-ntp-gradient"]),
    # DP = 2: each window's groups sit on both ranks; one rank scores it and trains its NTP term
    "ntp_dp2": (2, [*CURRICULUM, "--rlp-ntp-weight", "0.5", "--train-iters", "2",
                    "--record-positions", "--record-ntp-gradient"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for name, (nproc, extra) in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        torchrun(nproc, ["tests/workers/rlp_run.py", str(out / "snapshots"), *TINY_GPT,
                         *TRAIN_FLAGS, *COMMON, *extra,
                         "--rlp-metrics-file", str(out / "metrics.jsonl"),
                         "--rlp-dump-rollouts", str(out / "rollouts")])
        iters = len(read_jsonl(out / "metrics.jsonl"))
        results[name] = {
            "metrics": read_jsonl(out / "metrics.jsonl"),
            "rollouts": [torch.load(out / "rollouts" / f"iter{i:07d}_dp0.pt")
                         for i in range(1, iters + 1)],
            "snaps": torch.load(out / "snapshots" / "rank0.pt"),
        }
    return results


def _eligible(w: np.ndarray, eod: int) -> list[int]:
    start, out = 0, []
    for t in range(1, len(w)):
        if w[t - 1] == eod:
            start = t
        if w[t] != eod and t - start >= MIN_CONTEXT:
            out.append(t)
    return out


def _pick(w, h, iteration, eod, strategy, fraction, window_index, start=1, iters=1):
    """The selection rule, restated: rank the eligible positions by the entropy of the
    distribution that predicts them (ties by position), keep a band of ⌈f·n⌉ ranks — the top
    for 'entropy'; for the curriculum starting at rank ⌊p·(1−f)·n⌋, p the progress from
    --rlp-curriculum-start over --rlp-curriculum-iters — and draw K of them without
    replacement, keyed by (seed, window index). Returns (picks, eligible ranked by entropy)."""
    valid = _eligible(w, eod)
    n = len(valid)
    ranked = sorted(valid, key=lambda t: (h[t - 1], t))  # h[j] predicts w[j + 1]
    m = max(math.ceil(fraction * n), K)
    if strategy == "entropy":
        band = ranked[n - m:]
    else:
        p = min(1.0, max(0.0, (iteration - start) / iters))
        a = min(math.floor(p * (1 - fraction) * n), n - m)
        band = ranked[a:a + m]
    rng = np.random.default_rng([SEED, window_index])
    left, picks = sorted(band), []
    for _ in range(K):
        t = int(rng.choice(left))
        picks.append(t)
        left.remove(t)
    return picks, ranked


@pytest.mark.slow
@pytest.mark.parametrize("name, strategy, fraction", [("rpt_tp1", "entropy", 0.5),
                                                      ("rpt_tp2", "entropy", 0.5),
                                                      ("ntp_tp1", "curriculum", 0.25)])
def test_entropy_positions_are_those_a_naive_recomputation_picks(runs, name, strategy, fraction):
    records = runs[name]["snaps"]["positions"]
    assert len(records) == 2
    checked = 0
    for rec in records:
        for g, (t, start) in rec["chosen"].items():
            w = rec["windows"][g].numpy()
            eod = 7 if name.startswith("rpt") else 127  # NullTokenizer: vocab size − 1
            picks, ranked = _pick(w, rec["naive_entropy"][g].numpy(), rec["iteration"], eod,
                                  strategy, fraction, g // K)
            assert t == picks[g % K], (name, rec["iteration"], g)
            doc = max([s for s in range(t) if s == 0 or w[s - 1] == eod])
            assert start == max(doc, t - CONTEXT)
            checked += 1
        if strategy == "curriculum":  # iteration 1: the easiest quarter, 2: the hardest
            for g, (t, _) in rec["chosen"].items():
                w, h = rec["windows"][g].numpy(), rec["naive_entropy"][g].numpy()
                _, ranked = _pick(w, h, rec["iteration"], 127, strategy, fraction, g // K)
                rank = ranked.index(t) / len(ranked)
                assert rank < 0.3 if rec["iteration"] == 1 else rank >= 0.7, (rank, rec)
    assert checked == 2 * 16 // G


@pytest.mark.slow
def test_k_positions_per_window_are_k_independent_groups(runs):
    for name in ("rpt_tp1", "ntp_tp1"):
        for r, rec in zip(runs[name]["rollouts"], runs[name]["snaps"]["positions"]):
            by_group = {}
            for i, g in enumerate(r["groups"]):
                by_group.setdefault(g, []).append(i)
            assert sorted(len(v) for v in by_group.values()) == [G] * (16 // G)
            for b in {g // K for g in by_group}:
                groups = [b * K + j for j in range(K)]
                assert torch.equal(rec["windows"][groups[0]], rec["windows"][groups[1]])
                ts = [r["positions"][by_group[g][0]] for g in groups]
                assert len(set(ts)) == K  # distinct positions of one window
                for g in groups:  # each its own group: one prompt, its own baseline
                    rows = by_group[g]
                    assert len({tuple(r["prompts"][i]) for i in rows}) == 1
                    assert abs(float(r["advantages"][rows].sum())) < 1e-5


@pytest.mark.slow
def test_rpt_rewards_are_prefix_matches_and_tp2_equals_tp1(runs):
    a, b = runs["rpt_tp1"], runs["rpt_tp2"]
    rewards = []
    for ra, rb, rec in zip(a["rollouts"], b["rollouts"], a["snaps"]["positions"]):
        ia = sorted(range(len(ra["rows"])), key=ra["rows"].__getitem__)  # update order: by width
        ib = sorted(range(len(rb["rows"])), key=rb["rows"].__getitem__)
        for key in ("rows", "groups", "thoughts", "closed", "positions"):
            assert [ra[key][i] for i in ia] == [rb[key][i] for i in ib], key
        assert ra["generated_rows"] == rb["generated_rows"] and ra["predicted"] == rb["predicted"]
        for key in ("rewards", "advantages", "s_pred"):
            assert torch.allclose(ra[key][ia], rb[key][ib], atol=1e-5), key
        predicted = dict(zip(ra["generated_rows"], ra["predicted"]))
        for i, (row, g) in enumerate(zip(ra["rows"], ra["groups"])):
            t = rec["chosen"][g][0]
            truth = rec["windows"][g][t:t + 2].tolist()
            assert len(predicted[row]) == 2
            assert ra["rewards"][i].item() == float(predicted[row] == truth)
        rewards += ra["rewards"].tolist()
        assert "s_ema" not in str([k for k in a["metrics"][0] if "s_ema" in k or "info" in k])
    assert 0 < sum(rewards) < len(rewards), "no match or no mismatch: the test says nothing"
    for ma, mb in zip(a["metrics"], b["metrics"]):
        for key in ("rlp/reward", "rlp/loss", "rlp/s_pred"):
            assert abs(ma[key] - mb[key]) <= 1e-5, key


@pytest.mark.slow
def test_ntp_weight_adds_lambda_times_the_ntp_gradient_of_the_same_batch(runs):
    with_ntp, without = runs["ntp_tp1"]["snaps"], runs["ntp0_tp1"]["snaps"]
    total, rlp = with_ntp["step_grads"][0], without["step_grads"][0]
    ntp = with_ntp["ntp_grad"][0]
    worst = max((total[k] - rlp[k] - 0.5 * ntp[k]).abs().max().item() for k in total)
    rlp_size = max(v.abs().max().item() for v in rlp.values())
    ntp_size = max(v.abs().max().item() for v in ntp.values())
    print(f"max |g(λ) − g(0) − λ g_NTP| = {worst:.3g} (|g_RLP| {rlp_size:.3g}, "
          f"|g_NTP| {ntp_size:.3g})")
    assert rlp_size > 1e-4 and ntp_size > 1e-2 and worst <= 1e-6
    # the same positions, thoughts and rewards with and without the term
    ra, rb = runs["ntp_tp1"]["rollouts"][0], runs["ntp0_tp1"]["rollouts"][0]
    assert ra["thoughts"] == rb["thoughts"] and torch.equal(ra["rewards"], rb["rewards"])
    m = runs["ntp_tp1"]["metrics"][0]
    assert 1.0 < m["rlp/ntp_loss"] < 10.0  # per-token CE of a random 128-token model: ~ln 128
    # FLOPs: the term's windows (16 rows / (G·K) = 2 per step, fwd + bwd at --seq-length,
    # Megatron's formula) on top of the same RLP step
    flops_with, per_seq = with_ntp["flops"][0]
    flops_without, _ = without["flops"][0]
    windows = 16 // (G * K)
    assert flops_with - flops_without == pytest.approx(3 * windows * per_seq[64], rel=1e-9)


@pytest.mark.slow
def test_dp2_scores_each_window_once_and_equals_dp1(runs):
    """At DP = 2 the groups of a window sit on both ranks (micro-batch 2 of a K·G = 8 block): the
    owner of its first group scores it, draws its positions and trains its NTP term; positions,
    rewards, the NTP loss and the step's gradient equal DP = 1."""
    one, two = runs["ntp_tp1"], runs["ntp_dp2"]
    for rec_one, rec_two in zip(one["snaps"]["positions"], two["snaps"]["positions"]):
        assert rec_two["chosen"] and all(rec_one["chosen"][g] == tp for g, tp in
                                         rec_two["chosen"].items())
    for a, b in zip(one["metrics"], two["metrics"]):
        # (not rlp/flops: each rank cuts its micro-batches to its own rows, so the padding run
        # differs by layout)
        for key in ("rlp/info_gain", "rlp/s_pred", "rlp/s_ema", "rlp/ntp_loss", "rlp/loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    for ga, gb in zip(one["snaps"]["step_grads"], two["snaps"]["step_grads"]):
        worst = max((ga[k] - gb[k]).abs().max().item() for k in ga)
        assert worst <= 1e-6, worst

