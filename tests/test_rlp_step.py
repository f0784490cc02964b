"""RLP inside Megatron's training step, end to end on CPU (tiny GPT, mock data, torchrun).

One module-scoped pair of runs (TP=1 and TP=2, 3 RLP iterations each, same seed and initial
weights; TP=1 with the fused log-prob kernels, TP=2 through Megatron's output layer) backs several
claims: same thoughts, rewards and loss across TP; the loss Megatron
reports equals the clipped surrogate recomputed from the logged rollout; decode-time log-probs
equal teacher forcing; the EMA after two steps equals its closed form; the iteration line carries
the rlp/* fields.
"""


import pytest
import torch

from harness import (TINY_GPT, TRAIN_FLAGS, assert_same_gradients, decode_vs_teacher_forcing,
                     read_jsonl, torchrun)
from rlp_megatron import objective
from rlp_megatron import step as step_lib

G, THOUGHT, ITERS, TAU = 4, 16, 3, 0.5
RLP_FLAGS = [
    "--objective", "rlp", "--rlp-group-size", str(G), "--rlp-thought-length", str(THOUGHT),
    "--rlp-context-length", "32", "--rlp-min-context", "4", "--rlp-ema-decay", str(TAU),
    "--train-iters", str(ITERS),
    # the in-loop evaluation after iteration 2 (then iteration 3 trains as if it had not run)
    "--rlp-eval-interval", "2", "--rlp-eval-positions", "3",
]
# TP=2 also runs the log-probs through Megatron's output layer (--rlp-logprobs logits) while TP=1
# uses the fused kernels (the default): each claim below then also says "fused ≡ logits".
# DP=2 splits the one group of 4 rows over two data-parallel ranks (micro-batch 2).
LAYOUTS = {"tp1": (1, []),
           "tp2": (2, ["--tensor-model-parallel-size", "2", "--rlp-logprobs", "logits"]),
           "dp2": (2, [])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for name, (nproc, extra) in LAYOUTS.items():
        out = tmp_path_factory.mktemp(f"rlp_{name}")
        proc = torchrun(nproc, [
            "tests/workers/rlp_run.py", str(out / "snapshots"), "--record-grads", *TINY_GPT,
            *TRAIN_FLAGS,
            *RLP_FLAGS, *extra, "--rlp-metrics-file", str(out / "metrics.jsonl"),
            "--rlp-dump-rollouts", str(out / "rollouts"), "--tensorboard-dir", str(out / "tb")])
        results[name] = {
            "dir": out, "stdout": proc.stdout, "metrics": read_jsonl(out / "metrics.jsonl"),
            "rollouts": [torch.load(out / "rollouts" / f"iter{i:07d}_dp0.pt")
                         for i in range(1, ITERS + 1)],
            "dp_rollouts": [[torch.load(p) for p in sorted((out / "rollouts").glob(
                f"iter{i:07d}_dp*.pt"))] for i in range(1, ITERS + 1)],
        }
    return results


@pytest.mark.slow
def test_iteration_line_has_rlp_fields(runs):
    lines = [l for l in runs["tp2"]["stdout"].splitlines() if " iteration " in l and "rlp/" in l]
    assert len(lines) == ITERS
    for field in ("rlp/info_gain", "rlp/s_pred", "rlp/s_ema", "rlp/thought_len",
                  "rlp/closed_frac", "rlp/clip_frac", "rlp/thoughts_per_s",
                  "rlp/gen_tokens_per_s", "rlp/time_rollout_s", "rlp/time_teacher_s",
                  "rlp/time_update_s"):
        assert all(field in l for l in lines), field


@pytest.mark.slow
def test_rlp_metrics_reach_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["tp2"]["dir"] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("rlp/info_gain", "rlp/s_pred", "rlp/s_ema", "rlp/loss", "rlp/thoughts_per_s"):
        assert tag in tags, tag
    logged = [e.value for e in acc.Scalars("rlp/s_pred")]
    exact = [m["rlp/s_pred"] for m in runs["tp2"]["metrics"]]
    assert logged == pytest.approx(exact, abs=1e-5)  # negative values too


@pytest.mark.slow
def test_flops_count_is_the_rlp_steps_not_ntps(runs):
    """What --log-throughput and checkpoints get for an RLP step, with Megatron's per-sequence
    formula at the widths computed: the model body for the update (3 fwd) and the teacher, each
    micro-batch at its own longest row (rows sorted by width, so micro-batches hold rows of
    similar widths; no padding rows), and one forward per token fed to the rollout (each prompt
    once per context, each thought once per row; no scoring forward); the output projection
    (2·h·V per position) where it ran: with the fused kernels (TP=1) 4× over the update's
    positions plus S_pred's once per row, once per context for the teacher and once per rollout
    forward row; through Megatron's output layer (TP=2) at every position fed."""
    seq_len, logit = 64, 2 * 64 * 128  # --seq-length; 2 · hidden · padded vocabulary
    mbs = 2
    for name in ("tp1", "tp2"):
        snaps = torch.load(runs[name]["dir"] / "snapshots" / "rank0.pt")
        for (reported, fwd), r in zip(snaps["flops"], runs[name]["rollouts"]):
            groups = sorted(set(r["groups"]))
            prompts = {g: p for g, p in zip(r["groups"], r["prompts"])}
            # One batch of whole groups: prefill the shortest prompt once per context, feed each
            # prompt's tail once per context, then each row its thought and (at the budget) a
            # forced </think>, whose logits give S_pred; a row scored is dropped (with these
            # few rows, at once), so nothing else is fed.
            l_min = min(len(prompts[g]) for g in groups)
            fed = (sum(len(p) for p in prompts.values())
                   + sum(len(t) + (not c) for t, c in zip(r["thoughts"], r["closed"])))
            assert r["fed_tokens"] == fed
            # Update rows: prompt + thought (+ forced </think>), x_t only a label; sorted.
            widths = [len(p) + len(t) + (not c) for p, t, c in
                      zip(r["prompts"], r["thoughts"], r["closed"])]
            assert widths == sorted(widths)
            update = [(len(widths[i:i + mbs]), max(widths[i:i + mbs]))
                      for i in range(0, len(widths), mbs)]
            assert [tuple(u) for u in r["update_widths"]] == update
            assert r["thought_mask"].shape[1] == max(widths) < seq_len
            # Teacher rows: the context (the prompt without <think>); one per group, no padding
            # rows, buckets of similar widths.
            contexts = sorted(len(prompts[g]) - 1 for g in groups)
            teacher, i = [], 0
            for size in step_lib._length_buckets(contexts, mbs):
                teacher.append((size, contexts[i + size - 1]))
                i += size
            assert [tuple(t) for t in r["teacher_widths"]] == teacher
            n, c = len(r["rows"]), len(groups)
            if name == "tp1":  # fused
                assert r["logit_rows"] == c + fed - c * l_min  # prefill: the last position
                expected = (sum(3 * k * (fwd[w] - logit * w) for k, w in update)
                            + sum(k * (fwd[w] - logit * w) for k, w in teacher)
                            + (fwd[seq_len] / seq_len - logit) * fed
                            + logit * (4 * sum(k * w for k, w in update) + n + c
                                       + r["logit_rows"]))
            else:
                expected = (sum(3 * k * fwd[w] for k, w in update)
                            + sum(k * fwd[w] for k, w in teacher) + fwd[seq_len] / seq_len * fed)
            assert reported == pytest.approx(expected, rel=1e-9)
            assert reported > sum(3 * k * fwd[w] for k, w in update)  # more than the update


def test_length_buckets_bound_the_padding_of_each_micro_batch():
    widths = [3, 4, 4, 5, 9, 30, 31, 31, 32, 32, 32, 64]
    sizes = step_lib._length_buckets(widths, max_rows=4, slack=1 / 16)
    assert sum(sizes) == len(widths) and max(sizes) <= 4
    i = 0
    for size in sizes:
        bucket = widths[i:i + size]
        assert size * max(bucket) <= (1 + 1 / 16) * sum(bucket)
        i += size
    assert sizes == [1, 2, 1, 1, 4, 2, 1]  # greedy: a bucket closes only when it must
    assert step_lib._length_buckets([7] * 9, max_rows=4) == [4, 4, 1]
    assert step_lib._length_buckets([], max_rows=4) == []


@pytest.mark.slow
def test_tp2_matches_tp1_thoughts_rewards_and_loss(runs):
    for a, b in zip(runs["tp1"]["rollouts"], runs["tp2"]["rollouts"]):
        assert a["rows"] == b["rows"] and a["thoughts"] == b["thoughts"]
        assert a["closed"] == b["closed"]
        for key in ("s_pred", "s_ema", "advantages"):
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), key
    for a, b in zip(runs["tp1"]["metrics"], runs["tp2"]["metrics"]):
        assert a["iteration"] == b["iteration"]
        for key in ("rlp/loss", "rlp/info_gain", "rlp/s_pred", "rlp/s_ema", "rlp/thought_len"):
            assert abs(a[key] - b[key]) <= 1e-5, (key, a[key], b[key])


@pytest.mark.slow
def test_dp2_generates_and_scores_each_group_once_and_matches_tp1(runs):
    """A group whose rows sit on two data-parallel ranks is prefilled, decoded and teacher-scored
    on one of them (thoughts are exchanged as token ids): the job runs the rollout tokens and
    teacher contexts of one rank, and every thought, reward and the loss equal TP=1's."""
    for ref, parts in zip(runs["tp1"]["rollouts"], runs["dp2"]["dp_rollouts"]):
        assert len(parts) == 2 and all(len(p["rows"]) == 2 for p in parts)
        generated = [g for p in parts for g in p["rollout_groups"]]
        scored = [g for p in parts for g in p["teacher_groups"]]
        assert sorted(generated) == sorted(scored) == sorted(set(ref["groups"]))
        assert sum(p["fed_tokens"] for p in parts) == ref["fed_tokens"]
        position = {row: i for i, row in enumerate(ref["rows"])}
        for p in parts:
            idx = [position[row] for row in p["rows"]]
            assert p["thoughts"] == [ref["thoughts"][i] for i in idx]
            for key in ("s_pred", "s_ema", "advantages"):
                assert torch.allclose(p[key], ref[key][idx], atol=1e-5, rtol=0), key
    for a, b in zip(runs["tp1"]["metrics"], runs["dp2"]["metrics"]):
        for key in ("rlp/loss", "rlp/info_gain", "rlp/s_pred", "rlp/s_ema", "rlp/thought_len"):
            assert abs(a[key] - b[key]) <= 1e-5, (key, a[key], b[key])


@pytest.mark.slow
def test_fused_logprobs_give_the_gradients_of_megatrons_output_layer(runs):
    """TP=1 runs the fused kernels, TP=2 Megatron's output layer (--rlp-logprobs logits): the
    same gradient at every step, in the global layout."""
    assert_same_gradients(runs["tp1"]["dir"], runs["tp2"]["dir"], ITERS, "gpt fused vs logits")


@pytest.mark.slow
def test_rollout_groups_share_context_and_thoughts_follow_format(runs):
    for r in runs["tp1"]["rollouts"]:
        assert sorted(r["rows"]) == list(range(min(r["rows"]), min(r["rows"]) + len(r["rows"])))
        by_group = {}
        for row, group, prompt, target in zip(r["rows"], r["groups"], r["prompts"], r["targets"]):
            assert group == row // G
            by_group.setdefault(group, set()).add((tuple(prompt), target))
        assert all(len(v) == 1 for v in by_group.values())  # one context/target per group
        close = 126  # NullTokenizer: </think> is the id below end-of-document (127)
        for thought, closed in zip(r["thoughts"], r["closed"]):
            assert 1 <= len(thought) <= THOUGHT
            assert closed == (thought[-1] == close)
            assert close not in thought[:-1]
            assert closed or len(thought) == THOUGHT
        assert len(set(map(tuple, r["thoughts"]))) > 1  # sampling, not greedy copies


@pytest.mark.slow
def test_reported_loss_equals_clipped_surrogate_of_logged_rollout(runs):
    for r, m in zip(runs["tp1"]["rollouts"], runs["tp1"]["metrics"]):
        mask = r["thought_mask"]
        # The update runs on-policy (ρ ≡ 1, as rlp/ratio reports); recompute with logp = old_logp.
        assert m["rlp/ratio"] == pytest.approx(1.0, abs=1e-6)
        loss, stats = objective.clipped_surrogate_loss(
            r["old_logp"], r["old_logp"], r["advantages"], mask, 0.2, 0.2)
        assert m["rlp/loss"] == pytest.approx(loss.item(), abs=1e-6)
        # A token-mean aggregation would report something else whenever lengths differ.
        lengths = mask.sum(1)
        token_mean = -(r["advantages"] * lengths).sum() / lengths.sum()
        if lengths.unique().numel() > 1 and r["advantages"].abs().max() > 1e-3:
            assert abs(token_mean.item() - m["rlp/loss"]) > 1e-6
        assert stats["clip_frac"].item() == pytest.approx(m["rlp/clip_frac"], abs=1e-6)


@pytest.mark.slow
def test_rewards_and_advantages_follow_the_paper(runs):
    for r, m in zip(runs["tp1"]["rollouts"], runs["tp1"]["metrics"]):
        order = torch.argsort(torch.tensor(r["rows"]))
        s_pred = r["s_pred"][order].view(-1, G)
        s_ema = r["s_ema"][order].view(-1, G)
        assert torch.all(s_ema == s_ema[:, :1])  # one teacher score per context
        reward = objective.information_gain(s_pred, s_ema[:, :1])
        adv = objective.group_advantages(reward)
        assert torch.allclose(adv.reshape(-1).double(), r["advantages"][order].double(), atol=1e-6)
        assert m["rlp/info_gain"] == pytest.approx(reward.mean().item(), abs=1e-6)


@pytest.mark.slow
def test_decode_logprobs_match_teacher_forcing(runs):
    worst = worst_s = 0.0
    for r, m in zip(runs["tp1"]["rollouts"], runs["tp1"]["metrics"]):
        d = decode_vs_teacher_forcing(r)
        worst = max(worst, d.max().item())
        # The logged mismatch metric is this same quantity.
        assert m["rlp/logprob_mismatch"] == pytest.approx(d.mean().item(), abs=1e-9)
        assert m["rlp/logprob_mismatch_max"] == pytest.approx(d.max().item(), abs=1e-9)
        # S_pred comes from the rollout's decode step after </think>; the update's forward
        # scores the same x_t by teacher forcing (an off-by-one position would cost nats).
        assert m["rlp/s_pred_mismatch"] <= m["rlp/s_pred_mismatch_max"] + 1e-9
        worst_s = max(worst_s, m["rlp/s_pred_mismatch_max"])
    print(f"max |decode - teacher forcing| log-prob = {worst:.3g}, S_pred {worst_s:.3g}")
    assert worst <= 1e-4 and worst_s <= 1e-4


@pytest.mark.slow
def test_ema_after_two_steps_equals_closed_form(runs):
    snaps = torch.load(runs["tp1"]["dir"] / "snapshots" / "rank0.pt")
    theta, phi = snaps["theta"], snaps["phi"]
    assert len(theta) == ITERS + 1
    for name, phi2 in phi[1].items():
        expected = objective.ema_closed_form(theta[0][name], [theta[1][name], theta[2][name]], TAU)
        assert torch.allclose(phi2, expected, atol=1e-6, rtol=0), name
    moved = max((theta[2][n] - theta[0][n]).abs().max().item() for n in theta[0])
    assert moved > 1e-4  # the parameters really changed, so the check is not vacuous


@pytest.mark.slow
def test_ema_reads_updated_parameters_with_overlapped_param_gather(tmp_path):
    """Distributed optimizer + --overlap-param-gather: updated parameters are all-gathered lazily
    in the next forward, so an EMA update right after the step must sync them first (without
    that, φ here is off by ~1e-3)."""
    torchrun(2, ["tests/workers/rlp_run.py", str(tmp_path), *TINY_GPT, *TRAIN_FLAGS, *RLP_FLAGS,
                 "--global-batch-size", "8", "--use-distributed-optimizer",
                 "--overlap-param-gather", "--overlap-grad-reduce"])
    for rank in (0, 1):
        snaps = torch.load(tmp_path / f"rank{rank}.pt")
        theta, phi = snaps["theta"], snaps["phi"]
        for name, phi2 in phi[1].items():
            expected = objective.ema_closed_form(theta[0][name], [theta[1][name], theta[2][name]],
                                                 TAU)
            assert torch.allclose(phi2, expected, atol=1e-6, rtol=0), (rank, name)


@pytest.mark.slow
def test_in_loop_evaluation_is_the_same_at_tp1_tp2_and_dp2(runs):
    """rlp_eval/* after iteration 2: 3 held-out validation positions × G thoughts, at TP=1
    (fused kernels), TP=2 (Megatron's output layer) and DP=2 (positions split over the ranks)."""
    evals = {name: [m for m in r["metrics"] if "rlp_eval/info_gain" in m]
             for name, r in runs.items()}
    assert [m["iteration"] for m in evals["tp1"]] == [2]
    ref = evals["tp1"][0]
    assert ref["rlp_eval/reasoned_nll"] > 0 and ref["rlp_eval/nothink_nll"] > 0
    assert 0 < ref["rlp_eval/thought_len"] <= 16 and 0 <= ref["rlp_eval/closed_frac"] <= 1
    assert abs(ref["rlp_eval/info_gain"] - (ref["rlp_eval/nothink_nll"]
                                             - ref["rlp_eval/reasoned_nll"])) < 0.5  # φ ≈ θ
    for name in ("tp2", "dp2"):
        other = evals[name][0]
        for key in ("info_gain", "reasoned_nll", "nothink_nll", "thought_len", "closed_frac"):
            assert abs(ref[f"rlp_eval/{key}"] - other[f"rlp_eval/{key}"]) <= 1e-5, (name, key)
    lines = runs["tp2"]["stdout"].splitlines()
    line = [l for l in lines if " iteration        2/" in l][0]
    assert "rlp_eval/info_gain" in line  # Megatron's console line carries them
    line = [l for l in lines if " iteration        3/" in l][0]
    assert "rlp/info_gain" in line and "rlp_eval/" not in line  # not as zeros between evaluations

