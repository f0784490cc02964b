"""Same weights, different layouts (TP=1, TP=2, PP=2) → same logits, loss, gradients; KV-cache
decode through Megatron's inference context → same log-probs as teacher forcing.

The reference process saves its weights with dist_checkpointing at TP=1; the TP=2 and PP=2 runs
load (reshard) them. Gradients are saved as dist checkpoints too, so every layout is compared in
the global layout (this also covers Mamba's split in_proj / conv1d tensors).
"""

import os

import pytest
import torch

from harness import TINY_GPT, TINY_HYBRID, TRAIN_FLAGS, torchrun

MODELS = {"gpt": TINY_GPT, "hybrid": TINY_HYBRID}
LAYOUTS = {
    "reference": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "tp2sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def layout_runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"layouts_{request.param}")
    for mode, (nproc, extra) in LAYOUTS.items():
        torchrun(nproc, ["tests/workers/equivalence.py", str(out), mode,
                         *MODELS[request.param], *TRAIN_FLAGS, "--train-iters", "1", *extra])
    return request.param, out


def _results(out, mode, rank):
    return torch.load(out / f"{mode}_rank{rank}.pt")


def _grads(out, mode):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from harness import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    return dist_checkpointing.load_plain_tensors(str(out / f"grads_{mode}"))


@pytest.mark.slow
def test_tp2_matches_tp1_logits_and_loss(layout_runs):
    _, out = layout_runs
    ref, tp2 = _results(out, "reference", 0), _results(out, "tp2", 0)
    diff = (ref["logits"] - tp2["logits"]).abs().max().item()
    print(f"max|logits TP2 - TP1| = {diff:.3g}")
    assert ref["logits"].shape == tp2["logits"].shape
    assert diff <= 1e-5
    assert abs(ref["loss"] - tp2["loss"]) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("layout, rank", [("pp2", 1), ("tp2sp", 0)])  # loss on the last stage
def test_pp2_and_sequence_parallel_match_reference_loss(layout_runs, layout, rank):
    _, out = layout_runs
    ref, other = _results(out, "reference", 0), _results(out, layout, rank)
    assert abs(ref["loss"] - other["loss"]) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2sp"])
def test_gradients_match_reference_layout(layout_runs, layout):
    _, out = layout_runs
    ref, other = _grads(out, "reference"), _grads(out, layout)
    assert ref.keys() == other.keys()
    diffs = {k: (ref[k] - other[k]).abs().max().item() for k in ref}
    worst = max(diffs, key=diffs.get)
    print(f"{layout}: max|grad diff| = {diffs[worst]:.3g} ({worst})")
    assert max(v.abs().max().item() for v in ref.values()) > 1e-3  # gradients are not trivially 0
    assert diffs[worst] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reference", "tp2"])
def test_kv_cache_decode_matches_teacher_forcing(layout_runs, mode):
    _, out = layout_runs
    res = _results(out, mode, 0)
    diff = (res["decode_logprobs"] - res["tf_logprobs"]).abs().max().item()
    print(f"{mode}: max|decode - teacher forcing| = {diff:.3g}")
    assert res["decode_logprobs"].shape == (2, 15)
    assert diff <= 1e-4
