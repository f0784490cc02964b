"""Gumbel-max sampling over a vocabulary shard in one Triton pass (GPU; ``TRITON_INTERPRET=1``
on CPU).

:func:`rlp_megatron.rollout.sampling.gumbel_max_sample` in PyTorch materialises the counter-based
noise as int64 and float64 [rows, V/TP] tensors, one per elementwise op of the SplitMix64 hash
and of −log(−log u): about fifteen vocabulary-sized passes through memory per decode step, more
than the decode step's weight reads at rows × V/TP ≈ 128 × 32K. This kernel computes the same
hash, noise and score per vocabulary tile in registers and keeps a running (max, argmax) per row:
one read of the logits, two numbers written per row. The cross-shard reduction (one MAX and one
MIN all-reduce) stays in :mod:`rlp_megatron.rollout.sampling`.

Same arithmetic as the PyTorch path: the hash in wrapping 64-bit integers (uint64 here, int64
with logical shifts there: the same bits), u = (z >> 11 + 0.5) · 2⁻⁵³ and the score l / T + g in
float64, padded ids at −inf, the lowest id on ties. Only the float64 logarithms may differ in the
last bit (libdevice here, the host's libm there), which could change a sample only at an exact
tie of two scores; TP ranks all run the same implementation, so layouts still agree.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_GOLDEN = tl.constexpr(0x9E3779B97F4A7C15)  # SplitMix64's constants (rollout/sampling.py)
_MUL1 = tl.constexpr(0xBF58476D1CE4E5B9)
_MUL2 = tl.constexpr(0x94D049BB133111EB)


@triton.jit
def _gumbel_max_kernel(X, stride_x, KEYS, TEMP, BEST, ARG, n_cols, vocab_start, vocab_size,
                       BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    key = tl.load(KEYS + row).to(tl.uint64, bitcast=True)
    temperature = tl.load(TEMP)
    golden = tl.full((BLOCK_V,), _GOLDEN, tl.uint64)
    mul1 = tl.full((BLOCK_V,), _MUL1, tl.uint64)
    mul2 = tl.full((BLOCK_V,), _MUL2, tl.uint64)
    best = tl.full((), float("-inf"), tl.float64)
    arg = tl.full((), 0, tl.int64)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_shard = offs < n_cols
        x = tl.load(X + row * stride_x + offs, mask=in_shard, other=0.0)
        ids = vocab_start + offs
        z = key + ids.to(tl.uint64) * golden
        z = z + golden
        z = (z ^ (z >> 30)) * mul1
        z = (z ^ (z >> 27)) * mul2
        z = z ^ (z >> 31)
        u = ((z >> 11).to(tl.float64) + 0.5) * (1.0 / 9007199254740992.0)  # 2^-53
        score = x.to(tl.float32).to(tl.float64) / temperature - tl.log(-tl.log(u))
        score = tl.where(in_shard & (ids < vocab_size), score, float("-inf"))
        tile_best = tl.max(score, axis=0)
        tile_arg = tl.argmax(score, axis=0).to(tl.int64) + start
        better = tile_best > best  # strict: an earlier tile keeps a tie
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_best, best)
    tl.store(BEST + row, best)
    tl.store(ARG + row, arg)


def gumbel_max_local_triton(logits: torch.Tensor, keys: torch.Tensor, temperature: float,
                            vocab_start: int, vocab_size: int,
                            block_v: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` [rows, V_local]: the best Gumbel-max score (float64) over this
    shard's real ids and its local index (int64, as ``torch.max`` returns)."""
    logits = logits.contiguous()
    rows, n_cols = logits.shape
    best = torch.empty(rows, dtype=torch.float64, device=logits.device)
    arg = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return best, arg
    temp = torch.tensor([temperature], dtype=torch.float64, device=logits.device)
    block = min(block_v, triton.next_power_of_2(max(n_cols, 16)))
    _gumbel_max_kernel[(rows,)](logits, logits.stride(0), keys.contiguous(), temp, best, arg,
                                n_cols, vocab_start, vocab_size, BLOCK_V=block)
    return best, arg
