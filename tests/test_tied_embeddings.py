"""RLP with tied embeddings (Megatron's default, the paper's Qwen3-1.7B) at TP=1, TP=2 and PP=2,
with a padded vocabulary (120 real ids padded to 128).

Tied, the output layer has no weight of its own at PP=1 (``output_layer.weight is None``: the first
RLP iteration used to fail reading its shape); at PP=2 the last stage holds a copy of the
embedding that Megatron keeps in sync. All layouts start from one NTP checkpoint and must sample
the same thoughts and compute the same rewards and loss for 2 iterations (the second one after a
tied update). No thought may contain a padded id.
"""

import pytest
import torch

from harness import TINY_GPT, TRAIN_FLAGS, decode_vs_teacher_forcing, read_jsonl, torchrun

pytestmark = pytest.mark.slow

G, ITERS, REAL_VOCAB = 4, 2, 120
TIED_GPT = [f for f in TINY_GPT if f != "--untie-embeddings-and-output-weights"]
TIED_GPT[TIED_GPT.index("--vocab-size") + 1] = str(REAL_VOCAB)
RLP = ["--objective", "rlp", "--rlp-group-size", str(G), "--rlp-thought-length", "16",
       "--rlp-context-length", "32", "--rlp-min-context", "4", "--train-iters", str(ITERS),
       "--global-batch-size", "8"]
LAYOUTS = {"tp1": (1, []), "tp2": (2, ["--tensor-model-parallel-size", "2"]),
           "pp2": (2, ["--pipeline-model-parallel-size", "2"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    torchrun(1, ["-m", "rlp_megatron.train", *TIED_GPT, *TRAIN_FLAGS, "--train-iters", "1",
                 "--save", str(root / "init"), "--save-interval", "1"])
    results = {}
    for name, (nproc, extra) in LAYOUTS.items():
        out = root / name
        torchrun(nproc, ["-m", "rlp_megatron.train", *TIED_GPT, *TRAIN_FLAGS, *RLP, *extra,
                         "--pretrained-checkpoint", str(root / "init"),
                         "--save", str(out / "ckpt"), "--save-interval", str(ITERS),
                         "--rlp-metrics-file", str(out / "metrics.jsonl"),
                         "--rlp-dump-rollouts", str(out / "rollouts")])
        results[name] = {
            "dir": out, "metrics": read_jsonl(out / "metrics.jsonl"),
            "rollouts": [torch.load(out / "rollouts" / f"iter{i:07d}_dp0.pt")
                         for i in range(1, ITERS + 1)],
        }
    return results


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_tied_layout_matches_tp1(runs, layout):
    for a, b in zip(runs["tp1"]["rollouts"], runs[layout]["rollouts"]):
        assert a["rows"] == b["rows"] and a["thoughts"] == b["thoughts"], layout
        for key in ("s_pred", "s_ema", "advantages"):
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), (layout, key)
    for a, b in zip(runs["tp1"]["metrics"], runs[layout]["metrics"]):
        for key in ("rlp/loss", "rlp/info_gain", "rlp/s_pred", "rlp/s_ema", "rlp/thought_len"):
            assert abs(a[key] - b[key]) <= 1e-5, (layout, key, a[key], b[key])


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_thoughts_use_only_real_token_ids_and_decode_matches_training(runs, layout):
    tokens = [t for r in runs[layout]["rollouts"] for thought in r["thoughts"] for t in thought]
    assert len(tokens) > 50
    assert max(tokens) < REAL_VOCAB  # ids 120..127 are Megatron's padding
    for r in runs[layout]["rollouts"]:
        assert decode_vs_teacher_forcing(r).max().item() <= 1e-4


def test_tied_ema_sidecar_is_written_at_every_layout(runs):
    for name in LAYOUTS:
        assert (runs[name]["dir"] / "ckpt" / f"iter_{ITERS:07d}" / "rlp_ema" /
                "rlp_ema_complete.json").exists(), name
