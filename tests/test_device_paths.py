"""What a GPU run in bf16 relies on, checked on CPU: the tensors Transformer Engine's attention
receives, the precision of the logits RLP samples and scores from, the Mamba decode state, and the
GPU check kit itself (its tiny CPU mode).

The probe (tests/workers/rollout_probe.py) runs RLPStep's own rollout and scoring phases in bf16 on
3 contexts of different lengths × G = 2, with the output weight scaled by 32 (exactly) so that
logits reach a trained LM's magnitudes (16–32), where bf16 rounding of a logit costs up to 0.06
nats.
"""

import subprocess
import sys

import pytest
import torch

from harness import REPO, TINY_GPT, TINY_HYBRID, TRAIN_FLAGS, torchrun

pytestmark = pytest.mark.slow

MODELS = {"gpt": TINY_GPT, "hybrid": TINY_HYBRID}


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    out = {}
    for name, flags in MODELS.items():
        path = root / f"{name}.pt"
        torchrun(1, ["tests/workers/rollout_probe.py", str(path), "rollout", *flags,
                     *TRAIN_FLAGS, "--train-iters", "1", "--bf16",
                     "--probe-scale-output", "32"])
        out[name] = torch.load(path)
    return out


@pytest.mark.parametrize("model", MODELS)
def test_attention_core_receives_dense_tensors_in_every_rollout_phase(probes, model):
    """TE's fused attention reads q/k/v as dense sbhd. The prefill used to run in a cache sized
    for all rows, so attention got memory[:L, 0:n_contexts] (a strided batch slice)."""
    calls = [c for c in probes[model]["attention"] if c["phase"] == "rollout"]
    batches = [c["shapes"][0][1] for c in calls]
    # The prefill holds one row per context; decoding, contexts are expanded into their thoughts
    # (up to 3 × G = 6 rows) and finished rows leave: the cache is rebuilt, dense, each time.
    assert batches[0] == 3 and max(batches) == 6 and len(set(batches)) > 2, batches
    bad = [c for c in calls if not all(c["contiguous"])]
    assert not bad, bad[:3]


@pytest.mark.parametrize("model", MODELS)
def test_rlp_logprobs_are_fp32_from_bf16_inputs_and_never_use_the_output_layer(probes, model):
    """Megatron's bf16 output layer rounds each logit to bf16 before Float16Module's fp32 cast.
    RLP's forwards (rollout and scoring) never call it: the decode logits and every scored
    log-prob are computed in fp32 from the bf16 hidden states and output weight, within fp32
    accumulation of float64 arithmetic on the same inputs."""
    r = probes[model]
    assert not r["head"]  # Megatron's output layer did not run
    calls = r["kernels"]
    assert {(c["phase"], c["kind"]) for c in calls} == {("rollout", "decode"), ("score", "fused")}
    assert all(c["input_dtype"] == c["weight_dtype"] == "torch.bfloat16"
               and c["dtype"] == "torch.float32" for c in calls)
    assert max(c["max_logit"] for c in calls) >= 10  # where bf16 rounding costs 0.03+ nats
    worst = max(c["max_err"] for c in calls)
    print(f"{model}: max |fp32 kernel - float64 on the same bf16 inputs| = {worst:.3g}")
    assert worst <= 1e-4  # fp32 summation order only (bf16-rounded logits: up to 0.06)


def test_mamba_decode_state_is_fp32_under_bf16(probes):
    states = probes["hybrid"]["states"]
    assert states and all(s["ssm"] == "torch.float32" and s["conv"] == "torch.bfloat16"
                          for s in states)


@pytest.mark.parametrize("model", MODELS)
def test_bf16_decode_logprobs_stay_close_to_training_forward(probes, model):
    r = probes[model]
    diffs = torch.cat([(b - r["old_logp"][i][r["thought_mask"][i] > 0]).abs()
                       for i, b in enumerate(r["behaviour_logprobs"])])
    print(f"{model}: bf16 |decode - teacher forcing| mean {diffs.mean():.3g} max {diffs.max():.3g}")
    assert diffs.mean() <= 0.05  # logits of magnitude 20 in bf16; fp32 runs give ~1e-7


def test_gpu_check_kit_cpu_mode_passes():
    """The GPU check kit's tiny mode: bf16 RLP at TP=2 for a GPT and a hybrid model, with the
    distributed optimizer, overlapped grad reduce and param all-gather, NTP iterations in
    between; on-policy ratio, clip fraction, decode/training mismatch and the EMA sidecar."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpt-tiny: all checks passed" in proc.stdout
    assert "hybrid-tiny: all checks passed" in proc.stdout
