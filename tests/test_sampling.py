"""Vocab-parallel Gumbel-max sampling with counter-based noise."""

import math

import torch

from rlp_megatron.rollout import sampling

MASK = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_splitmix64_matches_reference_uint64_arithmetic():
    xs = [0, 1, 2, 12345, (1 << 63) - 1, (1 << 63) + 7, MASK]
    got = sampling.splitmix64(torch.tensor([sampling._i64(x) for x in xs], dtype=torch.int64))
    assert [v & MASK for v in got.tolist()] == [splitmix64_reference(x) for x in xs]


def test_sharded_sampling_equals_full_vocab_sampling():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    keys = sampling.row_keys(7, 3, torch.arange(64), 5)
    full = sampling.gumbel_max_sample(logits, keys, 0.7, vocab_start=0)
    # What two TP ranks compute before their MAX / MIN all-reduces.
    shards = [(0, logits[:, :25]), (25, logits[:, 25:])]
    best = []
    for start, shard in shards:
        u = sampling.uniform_noise(keys, start, shard.shape[1])
        scores = shard.double() / 0.7 - torch.log(-torch.log(u))
        val, arg = scores.max(-1)
        best.append((val, arg + start))
    pick = torch.where(best[0][0] >= best[1][0], best[0][1], best[1][1])
    assert torch.equal(full, pick)


def test_samples_follow_softmax_at_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    n = 40000
    keys = sampling.row_keys(123, 0, torch.arange(n), 0)
    toks = sampling.gumbel_max_sample(logits.expand(n, -1), keys, 0.7, 0)
    freq = torch.bincount(toks, minlength=5).double() / n
    p = torch.softmax(logits[0].double() / 0.7, 0)
    # 5 standard errors per category.
    assert torch.all((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / n)), (freq, p)


def test_noise_is_uniform_and_depends_on_every_key_part():
    keys = sampling.row_keys(1, 2, torch.arange(1000), 3)
    u = sampling.uniform_noise(keys, 0, 100)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.01
    base = sampling.row_keys(1, 2, torch.tensor([5]), 3)
    for other in (sampling.row_keys(2, 2, torch.tensor([5]), 3),
                  sampling.row_keys(1, 3, torch.tensor([5]), 3),
                  sampling.row_keys(1, 2, torch.tensor([6]), 3),
                  sampling.row_keys(1, 2, torch.tensor([5]), 4)):
        assert not torch.equal(base, other)
    assert math.isclose(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1].item(), 0, abs_tol=0.1)


def test_padded_vocabulary_ids_are_never_sampled():
    """Megatron pads the vocabulary; the padded rows of the output layer are trained parameters
    whose logits can win. Two TP shards of 64 ids, real vocabulary 120, padded logits huge."""
    logits = torch.zeros(256, 128)
    logits[:, 120:] = 50.0
    keys = sampling.row_keys(3, 1, torch.arange(256), 0)
    assert (sampling.gumbel_max_sample(logits, keys, 1.0, 0) >= 120).all()  # what it used to do
    full = sampling.gumbel_max_sample(logits, keys, 1.0, 0, vocab_size=120)
    assert full.max() < 120
    # The shard holding the padding masks it; the other shard is unaffected.
    lo = sampling.gumbel_max_sample(logits[:, :64], keys, 1.0, 0, vocab_size=120)
    hi = sampling.gumbel_max_sample(logits[:, 64:], keys, 1.0, 64, vocab_size=120)
    assert hi.max() < 120 and lo.max() < 64


def test_logprobs_are_over_the_real_vocabulary():
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state

    from harness import free_port
    from rlp_megatron.logprobs import VocabShard, token_logprobs

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)

    logits = torch.randn(5, 128)
    logits[:, 120:] = 30.0
    targets = torch.tensor([0, 5, 17, 64, 119])
    got = token_logprobs(logits, targets, 0.7, VocabShard(start=0, size=128, vocab_size=120))
    expected = torch.log_softmax(logits[:, :120] / 0.7, -1).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(got, expected, atol=1e-5)


_TRITON_VS_TORCH = """
import torch
from rlp_megatron.kernels import triton_sampling
from rlp_megatron.rollout import sampling

assert type(triton_sampling._gumbel_max_kernel).__name__ == "InterpretedFunction"
gen = torch.Generator().manual_seed(0)
# (rows, ids in this shard, shard start, real vocabulary, T): several tiles of 128 ids, a
# padded tail, a shard of padding only past the real vocabulary, logits of a bf16 model.
for rows, n, start, vocab, T, dtype in [(6, 300, 0, 280, 0.7, torch.float32),
                                        (4, 1000, 1000, 1500, 1.0, torch.float32),
                                        (5, 64, 64, 100, 1.3, torch.bfloat16)]:
    logits = (torch.randn(rows, n, generator=gen) * 3).to(dtype)
    keys = sampling.row_keys(5, 2, torch.arange(rows) + start, 7)
    best, arg = triton_sampling.gumbel_max_local_triton(logits, keys, T, start, vocab, block_v=128)
    ref_best, ref_arg = sampling.local_gumbel_max(logits, keys, T, start, vocab)
    assert torch.equal(arg, ref_arg), (arg, ref_arg)
    assert torch.equal(best, ref_best), (best - ref_best).abs().max()
    ids = sampling.gumbel_max_sample(logits, keys, T, start, vocab_size=vocab, impl="triton")
    assert torch.equal(ids, sampling.gumbel_max_sample(logits, keys, T, start, vocab_size=vocab,
                                                       impl="torch"))
print("ok")
"""


def test_triton_sampler_equals_the_pytorch_reference():
    """The one-pass Triton sampler (GPU) under TRITON_INTERPRET=1: the same local best score,
    bit for bit, and the same sampled ids as the PyTorch reference."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "RLP_MEGATRON_CPU_BACKEND": "0"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_VS_TORCH], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
