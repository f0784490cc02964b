"""RLP on the tiny hybrid (Mamba-2 + attention + MLP) model across layouts: TP=2, PP=2 (and
TP=2×PP=2) equal TP=1/PP=1 — same thoughts, rewards, loss and gradients at every step;
Mamba decode log-probs equal teacher forcing; PP rollouts send only token ids backwards.

With tied embeddings (Megatron's default; the GPT tests run untied) and a padded vocabulary (120
real ids padded to 128): tied, the output layer has no weight of its own at PP=1 (the first RLP
iteration used to fail reading its shape), and at PP=2 the last stage holds a copy of the
embedding that Megatron keeps in sync; padded ids must never be sampled.

All layouts start from the same weights: a one-iteration NTP checkpoint loaded with
``--pretrained-checkpoint`` (Megatron seeds initialisation per pipeline stage, so fresh
initialisations differ between PP layouts).
"""


import pytest
import torch

from harness import (TINY_HYBRID, TRAIN_FLAGS, assert_same_gradients, decode_vs_teacher_forcing,
                     load_plain, read_jsonl, torchrun)

G, ITERS, REAL_VOCAB = 4, 3, 120
TIED_HYBRID = [f for f in TINY_HYBRID if f != "--untie-embeddings-and-output-weights"]
TIED_HYBRID[TIED_HYBRID.index("--vocab-size") + 1] = str(REAL_VOCAB)
# Positions by entropy and the NTP term (--rlp-ntp-weight) run here too: the entropy forward over
# the windows, its positions sent from the last stage, and the NTP micro-batches (full windows,
# next to the update's trimmed rows) through the pipeline schedule must give the same positions
# and gradients at every layout. (The uniform positions are a pure function of the window.)
RLP = ["--objective", "rlp", "--rlp-group-size", str(G), "--rlp-thought-length", "16",
       "--rlp-context-length", "32", "--rlp-min-context", "4", "--train-iters", str(ITERS),
       "--rlp-positions", "entropy", "--rlp-ntp-weight", "0.5"]
LAYOUTS = {
    "tp1": (1, []),
    # TP=2 also decodes in rollout micro-batches of 2 rows (instead of all 4 at once): the
    # thoughts must not depend on how rows are batched.
    "tp2": (2, ["--tensor-model-parallel-size", "2", "--rlp-rollout-micro-batch-size", "2"]),
    # PP=2 runs its log-probs through Megatron's output layer (--rlp-logprobs logits); the others
    # use the fused kernels (the default): equal runs also mean "fused ≡ logits" at PP=2.
    "pp2": (2, ["--pipeline-model-parallel-size", "2", "--record-rollout-communication",
                "--rlp-logprobs", "logits"]),
}
SLOW_LAYOUT = ("tp2pp2", 4, ["--tensor-model-parallel-size", "2",
                             "--pipeline-model-parallel-size", "2"])


def _run(root, name, nproc, extra):
    out = root / name
    torchrun(nproc, ["tests/workers/rlp_run.py", str(out / "snapshots"), "--record-grads",
                     *TIED_HYBRID,
                     *TRAIN_FLAGS, *RLP, *extra, "--pretrained-checkpoint", str(root / "init"),
                     "--save", str(out / "ckpt"), "--save-interval", str(ITERS),
                     "--rlp-metrics-file", str(out / "metrics.jsonl"),
                     "--rlp-dump-rollouts", str(out / "rollouts")])
    return {
        "dir": out, "metrics": read_jsonl(out / "metrics.jsonl"),
        "rollouts": [torch.load(out / "rollouts" / f"iter{i:07d}_dp0.pt")
                     for i in range(1, ITERS + 1)],
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid_rlp")
    torchrun(1, ["-m", "rlp_megatron.train", *TIED_HYBRID, *TRAIN_FLAGS, "--train-iters", "1",
                 "--save", str(root / "init"), "--save-interval", "1"])
    return root


@pytest.fixture(scope="module")
def runs(root):
    return {name: _run(root, name, nproc, extra) for name, (nproc, extra) in LAYOUTS.items()}


def _assert_same_run(ref, other, name):
    for a, b in zip(ref["rollouts"], other["rollouts"]):
        assert a["rows"] == b["rows"] and a["thoughts"] == b["thoughts"], name
        assert a["positions"] == b["positions"], name
        for key in ("s_pred", "s_ema", "advantages"):
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), (name, key)
    for a, b in zip(ref["metrics"], other["metrics"]):
        for key in ("rlp/loss", "rlp/info_gain", "rlp/s_pred", "rlp/s_ema", "rlp/thought_len",
                    "rlp/ntp_loss"):
            assert abs(a[key] - b[key]) <= 1e-5, (name, key, a[key], b[key])
    # Gradients of every step, compared in the global layout (Mamba's split in_proj included).
    # (Parameters after Adam steps are not compared: Adam's g/√v turns 1e-9 gradient noise on
    # near-zero gradients into lr-sized differences.)
    assert_same_gradients(ref["dir"], other["dir"], ITERS, name)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_layout_matches_tp1_pp1(runs, layout):
    _assert_same_run(runs["tp1"], runs[layout], layout)


@pytest.mark.slow
def test_pp2_micro_batches_are_cut_to_their_own_rows_as_at_pp1(runs):
    """Megatron's schedule at PP=2 exchanges each micro-batch's shape (RLP runs it with
    variable_seq_lengths), so the update's and the teacher's micro-batches have the same widths
    as at PP=1 — each its own longest row, not the step's."""
    for a, b in zip(runs["tp1"]["rollouts"], runs["pp2"]["rollouts"]):
        assert b["update_widths"] == a["update_widths"]
        assert b["teacher_widths"] == a["teacher_widths"]
        widths = [len(p) + len(t) + (not c)
                  for p, t, c in zip(b["prompts"], b["thoughts"], b["closed"])]
        assert widths == sorted(widths)
        assert [tuple(u) for u in b["update_widths"]] == [
            (len(widths[i:i + 2]), max(widths[i:i + 2])) for i in range(0, len(widths), 2)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_tied_thoughts_use_only_real_token_ids_and_the_sidecar_is_written(runs, layout):
    tokens = [t for r in runs[layout]["rollouts"] for th in r["thoughts"] for t in th]
    assert len(tokens) > 50 and max(tokens) < REAL_VOCAB  # 120..127 are Megatron's padding
    assert (runs[layout]["dir"] / "ckpt" / f"iter_{ITERS:07d}" / "rlp_ema" /
            "rlp_ema_complete.json").exists()


@pytest.mark.slow
def test_parameters_really_moved(runs, root):
    before = load_plain(root / "init" / "iter_0000001")
    after = load_plain(runs["tp1"]["dir"] / "ckpt" / f"iter_{ITERS:07d}")
    keys = [k for k in after if not k.startswith("optimizer") and k in before]
    assert max((after[k] - before[k]).abs().max().item() for k in keys) > 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_hybrid_decode_logprobs_match_teacher_forcing(runs, layout):
    worst = worst_s = 0.0
    for r, m in zip(runs[layout]["rollouts"], runs[layout]["metrics"]):
        d = decode_vs_teacher_forcing(r)
        worst = max(worst, d.max().item())
        # rlp/logprob_mismatch is exactly this independent recomputation.
        assert m["rlp/logprob_mismatch"] == pytest.approx(d.mean().item(), abs=1e-9)
        assert m["rlp/logprob_mismatch_max"] == pytest.approx(d.max().item(), abs=1e-9)
        worst_s = max(worst_s, m["rlp/s_pred_mismatch_max"])  # S_pred: decode vs the update
    print(f"{layout}: hybrid rlp/logprob_mismatch max = {worst:.3g}, S_pred {worst_s:.3g}")
    assert worst <= 1e-4 and worst_s <= 1e-4


@pytest.mark.slow
def test_pp_rollout_sends_hidden_states_forward_and_only_token_ids_back(runs):
    comm = []
    for rank in (0, 1):
        comm += [dict(c, rank=rank) for c in
                 torch.load(runs["pp2"]["dir"] / "snapshots" / f"rank{rank}.pt")["comm"]]
    rows = len(runs["pp2"]["rollouts"][0]["rows"])
    sends = [c for c in comm if c["op"] in ("send", "isend")]
    recvs = [c for c in comm if c["op"] in ("recv", "irecv")]
    broadcasts = [c for c in comm if c["op"] == "broadcast"]
    assert sends and recvs and broadcasts
    assert all(c["pp_rank"] == 0 for c in sends)  # forward only: stage 0 → stage 1
    assert all(c["pp_rank"] == 1 for c in recvs)
    # Forward: hidden states [s, b, h] — the prefill once per context (b = contexts), then one
    # token per row per decode step (b = rows).
    assert all(len(c["shape"]) == 3 and c["shape"][2] == 64 and c["dtype"] == "torch.float32"
               and c["shape"][1] in (rows, rows // G) for c in sends)
    assert any(c["shape"][0] > 1 and c["shape"][1] == rows // G for c in sends)  # one prefill
    assert sum(c["shape"][1] == rows for c in sends) >= 16  # decode steps
    # Backwards (last stage → others): one int64 token id per row, never logits.
    assert all(c["shape"] == (rows,) and c["dtype"] == "torch.int64" for c in broadcasts)
    assert all(c["src"] == 1 for c in broadcasts)
    vocab = 128
    assert not any(c["shape"] and vocab in c["shape"] for c in comm)


@pytest.mark.slow
def test_tp2_pp2_matches_tp1_pp1(runs, root):
    name, nproc, extra = SLOW_LAYOUT
    _assert_same_run(runs["tp1"], _run(root, name, nproc, extra), name)
