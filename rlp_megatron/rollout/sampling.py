"""Temperature sampling over vocab-parallel logits, without gathering the vocabulary.

Gumbel-max: x = argmax_v (l_v / T + g_v) with g_v = −log(−log u_v), u_v ~ U(0, 1), is an exact
sample of softmax(l / T). Each TP rank scores its vocab shard, then one MAX all-reduce finds the
best score and one MIN all-reduce picks the (lowest) global id achieving it: 2 scalars per row
cross the TP group instead of [rows, V] logits.

The noise is counter-based, not drawn from a generator: u_v for (seed, iteration, row, step, v) is
a SplitMix64 hash of those integers. So every TP rank, DP layout, pipeline stage or resumed run
draws the same u_v for the same global row, the TP=2 samples equal the TP=1 samples token for
token, and there is no rollout RNG state to checkpoint. (Per-rank independent noise would also
give the right distribution, but not reproducible thoughts across layouts.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlp_megatron import kernels

_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """Two's-complement int64 view of a uint64 constant."""
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MUL1 = _i64(0xBF58476D1CE4E5B9)
_MUL2 = _i64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def row_keys(seed: int, iteration: int, rows: torch.Tensor, step: int) -> torch.Tensor:
    """One int64 key per (seed, iteration, global row, decode step)."""
    base = splitmix64(torch.tensor([_i64(seed)], dtype=torch.int64, device=rows.device))
    base = splitmix64(base ^ iteration)
    k = splitmix64(base ^ rows.to(torch.int64))
    return splitmix64(k ^ step)


def uniform_noise(keys: torch.Tensor, vocab_start: int, vocab_size_local: int) -> torch.Tensor:
    """u in (0, 1), float64, shape [rows, vocab_size_local], for global vocab ids from vocab_start."""
    v = torch.arange(vocab_start, vocab_start + vocab_size_local, dtype=torch.int64,
                     device=keys.device)
    z = splitmix64(keys[:, None] + v[None, :] * _GOLDEN)
    mantissa = _shr(z, 11).to(torch.float64)  # 53 random bits
    return (mantissa + 0.5) * (1.0 / (1 << 53))


def gumbel_max_sample(vocab_parallel_logits: torch.Tensor, keys: torch.Tensor, temperature: float,
                      vocab_start: int, tp_group=None, vocab_size: int | None = None,
                      impl: str = "auto") -> torch.Tensor:
    """Sample one token per row from softmax(logits / T) given logits sharded over the vocab;
    ids ≥ ``vocab_size`` (Megatron's vocabulary padding) are never drawn. ``impl`` as in
    :mod:`rlp_megatron.kernels`: on CUDA tensors one Triton pass per shard
    (:mod:`rlp_megatron.kernels.triton_sampling`), else :func:`local_gumbel_max`."""
    n_local = vocab_parallel_logits.shape[-1]
    if vocab_size is None:
        vocab_size = vocab_start + n_local
    kernel = kernels.pick(impl, vocab_parallel_logits, "gumbel_max_local_triton")
    if kernel is not None:
        local_best, local_arg = kernel(vocab_parallel_logits, keys, temperature, vocab_start,
                                       vocab_size)
    else:
        local_best, local_arg = local_gumbel_max(vocab_parallel_logits, keys, temperature,
                                                 vocab_start, vocab_size)
    best = local_best.clone()
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=tp_group)
    sentinel = torch.iinfo(torch.int64).max
    ids = torch.where(local_best == best, local_arg + vocab_start,
                      torch.full_like(local_arg, sentinel))
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(ids, op=dist.ReduceOp.MIN, group=tp_group)
    return ids


def local_gumbel_max(logits: torch.Tensor, keys: torch.Tensor, temperature: float,
                     vocab_start: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: per row, the best score l / T + g over this shard's real ids (float64) and
    its local index."""
    u = uniform_noise(keys, vocab_start, logits.shape[-1])
    scores = logits.float().double() / temperature - torch.log(-torch.log(u))
    if vocab_start + logits.shape[-1] > vocab_size:
        ids = torch.arange(vocab_start, vocab_start + logits.shape[-1], device=scores.device)
        scores = scores.masked_fill(ids >= vocab_size, float("-inf"))
    return scores.max(dim=-1)
