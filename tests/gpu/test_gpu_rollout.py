"""On a GPU (skipped without CUDA; `bash benchmarks/gpu_check.sh` runs them): the properties of
tests/test_device_paths.py with CUDA kernels — Transformer Engine's attention when installed,
Megatron's Triton Mamba decode kernels when mamba-ssm is not — in bf16."""

import os
import subprocess
import sys

import pytest
import torch

from harness import REPO, free_port

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _impl():
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return "local"
    return "transformer_engine"


COMMON = ["--seq-length", "256", "--max-position-embeddings", "256", "--mock-data",
          "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000",
          "--make-vocab-size-divisible-by", "128", "--seed", "1234", "--bf16",
          "--transformer-impl", _impl(), "--no-gradient-accumulation-fusion",
          "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
          "--no-rope-fusion", "--no-persist-layer-norm", "--hidden-dropout", "0",
          "--attention-dropout", "0", "--micro-batch-size", "2", "--global-batch-size", "4",
          "--lr", "1e-6", "--train-iters", "1", "--eval-iters", "0", "--eval-interval", "1000",
          "--untie-embeddings-and-output-weights", "--normalization", "RMSNorm"]
MODELS = {
    "gpt": ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8",
            "--position-embedding-type", "rope", "--swiglu"],
    "hybrid": ["--hybrid-layer-pattern", "M-*-M-M-", "--num-layers", "8", "--hidden-size", "512",
               "--ffn-hidden-size", "1024", "--num-attention-heads", "8",
               "--group-query-attention", "--num-query-groups", "4", "--mamba-num-heads", "16",
               "--mamba-head-dim", "64", "--mamba-state-dim", "64", "--mamba-num-groups", "4",
               "--position-embedding-type", "none", "--squared-relu"],
}


@pytest.fixture(scope="module", params=list(MODELS))
def probe(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_probe") / f"{request.param}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "tests/workers/rollout_probe.py", str(out), "rollout", *MODELS[request.param],
           *COMMON, "--probe-scale-output", "32"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}{os.pathsep}"
                                       f"{REPO / 'tests' / 'workers'}{os.pathsep}"
                                       f"{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return request.param, torch.load(out)


def test_attention_inputs_are_dense_during_rollouts(probe):
    name, r = probe
    calls = [c for c in r["attention"] if c["phase"] == "rollout"]
    assert calls and all(all(c["contiguous"]) for c in calls), name


def test_logits_are_fp32_products_under_bf16(probe):
    name, r = probe
    assert all(h["dtype"] == "torch.float32" for h in r["head"]), name
    # cuBLAS fp32 GEMM (TF32 off by default for matmul) vs torch.matmul: summation order only.
    assert max(h["max_err"] for h in r["head"]) <= 1e-3, name


def test_decode_matches_training_forward_in_bf16(probe):
    name, r = probe
    diffs = torch.cat([(b - r["old_logp"][i][r["thought_mask"][i] > 0]).abs()
                       for i, b in enumerate(r["behaviour_logprobs"])])
    print(f"{name}: bf16 GPU |decode - teacher forcing| mean {diffs.mean():.3g} max {diffs.max():.3g}")
    assert diffs.mean() <= 0.05, name


def test_mamba_decode_state_is_fp32(probe):
    name, r = probe
    if name == "hybrid":
        assert r["states"] and all(s["ssm"] == "torch.float32" for s in r["states"])


def test_triton_sampler_equals_the_pytorch_path_on_gpu():
    """One Triton pass per vocabulary shard against the PyTorch reference (about fifteen
    [rows, V/TP] int64/float64 passes): the same samples; the time ratio is printed."""
    from rlp_megatron.rollout import sampling

    rows, n_local, vocab = 128, 32768, 32000  # the last 768 ids are padding
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(rows, n_local, device="cuda", generator=gen) * 3
    keys = sampling.row_keys(1, 1, torch.arange(rows, device="cuda"), 0)
    kw = dict(vocab_size=vocab)
    fast = sampling.gumbel_max_sample(logits, keys, 0.7, 0, impl="triton", **kw)
    ref = sampling.gumbel_max_sample(logits, keys, 0.7, 0, impl="torch", **kw)
    assert torch.equal(fast, ref) and int(fast.max()) < vocab
    times = {}
    for impl in ("triton", "torch"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            sampling.gumbel_max_sample(logits, keys, 0.7, 0, impl=impl, **kw)
        end.record()
        torch.cuda.synchronize()
        times[impl] = start.elapsed_time(end) / 20
    print(f"Gumbel-max over [{rows}, {n_local}]: triton {times['triton']:.3f} ms, "
          f"torch {times['torch']:.3f} ms, ratio {times['torch'] / times['triton']:.1f}x")
