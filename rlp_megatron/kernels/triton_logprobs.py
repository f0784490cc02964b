"""Triton kernels for vocab-parallel token log-probs: ``log softmax(logits / T)[target]`` (and the
entropy of ``softmax(logits / T)``) from this TP rank's vocabulary shard, without gathering it.

What it computes. For each row of a ``[N, V_local]`` logits shard covering global ids
``[vocab_start, vocab_start + V_local)`` (ids ≥ ``vocab_size``, Megatron's vocabulary padding, are
−inf), one pass reads the logits once in their own dtype and accumulates in fp32 an online softmax
state ``(m, s, w)``: the max of ``l/T``, ``s = Σ exp(l/T − m)`` and ``w = Σ exp(l/T − m)(l/T − m)``
(entropy only), plus the target's ``l/T`` on the shard that owns it (−inf elsewhere). Partial
states of vocabulary splits of a row (more programs when there are few rows) and of TP ranks are
merged with the same online-softmax rule: one MAX all-reduce of ``(m, target)`` and one SUM
all-reduce of the rescaled ``(s, w)``; then ``lse = M + log S``, ``logp = target − lse`` and
``H = log S − W/S`` (relative to the max, so no cancellation of two ~30-nat numbers). The
backward kernel writes ``dlogits = g·(onehot − exp(l/T − lse))/T`` in the logits' dtype on every
shard with no communication; padded ids get 0. Only ``[N]`` vectors are saved besides the logits.

Why. Megatron-RL's path gathers the full vocabulary (``[N, V]`` per rank, then an fp32
log_softmax); Megatron's ``vocab_parallel_cross_entropy`` avoids the gather but needs fp32 logits
(under bf16 an fp32 copy of the shard, plus the masked / tempered copies ``token_logprobs`` made),
which it overwrites with exp-logits and saves for backward. The reward ``S_pred − S_EMA`` needs
fp32 accumulation over the real vocabulary; here the only ``[N, V_local]`` tensors are the logits
in their own dtype and, in backward, their gradient (benchmarks/logprob_memory.py measures it).

Alternatives evaluated (sources read: liger-kernel 0.8.5, cut-cross-entropy 25.1.1):

* liger-kernel ``LigerVocabParallelCEFunction`` (Triton, TP): vocab_start is fixed to
  ``rank·V_local`` and there is no padded-vocab mask, temperature or entropy; it writes and saves
  an fp32 ``exp`` buffer ``[BT, V_local]`` for backward, i.e. the memory of Megatron's fp32 copy.
* liger-kernel ``LigerFusedLinearScaledCrossEntropyTPFunction`` (fused linear, TP): per-token NLL
  with temperature and entropy (with entropy gradient), input grad all-reduced over TP, weight grad
  local: the closest match. But it raises on non-CUDA tensors (our CI is CPU/gloo), has no
  padded-vocab mask (padded rows of Megatron's output weight are trained parameters with finite
  logits), and its fast path needs the ``liger-cute-kernels`` + NVSHMEM extras, bf16 and SM90/100;
  elsewhere it is a 512-token chunked PyTorch loop, which is what our torch path is.
* Apple's Cut Cross-Entropy (``linear_cross_entropy``): no TP (targets must index the given
  classifier, the LSE is not returned for a cross-shard merge), no temperature (``e/T`` would be
  rounded in bf16), no entropy, backward asserts bf16/fp16 embeddings, and by default it skips
  gradient blocks whose softmax is below ``eps(bf16)/32`` (``filter_eps``): an approximate gradient.

Chosen: our own small kernels (this file; no dependency beyond Triton, which ships with CUDA
torch) plus the chunked PyTorch path in ``torch_logprobs.py``, because we need exactly: any
``vocab_start`` with padded-vocab masking, temperature, an entropy output, an exact (unfiltered),
autograd-correct backward with no communication for the logits path, and a path our CPU/gloo CI
runs (these kernels run under ``TRITON_INTERPRET=1`` on CPU tensors). There is no Triton fused
linear kernel (a GEMM + online-LSE tile kernel): ``fused_linear_logprobs`` runs the chunked PyTorch
path on GPU too (``impl="auto"`` falls back to it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl


@triton.jit
def _logprob_stats_kernel(
    X, stride_x, TGT, M_OUT, S_OUT, W_OUT, T_OUT,
    n_cols, cols_per_split, n_splits, vocab_start, vocab_size, temperature,
    ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program (row, split): online-softmax state of columns [split·cols_per_split, +cols_per_split)
    of one row of logits / T, and the target's logit / T if it lies in them (else −inf)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    x_row = X + row * stride_x
    col0 = split * cols_per_split
    col_end = tl.minimum(col0 + cols_per_split, n_cols)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)
    for start in range(col0, col_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = (cols < col_end) & (vocab_start + cols < vocab_size)
        x = tl.load(x_row + cols, mask=valid, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all −inf so far: keep exp() finite
        alpha = tl.exp(m - m_safe)
        p = tl.exp(x - m_safe)  # 0 at masked columns
        if ENTROPY:
            # w = Σ p (x − m): rebase the old sum to the new max, then add this block.
            delta = tl.where(m == float("-inf"), 0.0, m - m_safe)
            d = tl.where(valid, x - m_safe, 0.0)
            w = alpha * (w + delta * s) + tl.sum(p * d, 0)
        s = alpha * s + tl.sum(p, 0)
        m = m_new
    tgt = tl.load(TGT + row) - vocab_start
    own = (tgt >= col0) & (tgt < col_end) & (tgt + vocab_start < vocab_size)
    t = tl.load(x_row + tgt, mask=own, other=float("-inf")).to(tl.float32) / temperature
    out = row * n_splits + split
    tl.store(M_OUT + out, m)
    tl.store(S_OUT + out, s)
    tl.store(T_OUT + out, tl.where(own, t, float("-inf")))
    if ENTROPY:
        tl.store(W_OUT + out, w)


@triton.jit
def _logprob_grad_kernel(
    X, stride_x, DX, stride_dx, TGT, LSE, G, n_cols, vocab_start, vocab_size, temperature,
    BLOCK_V: tl.constexpr,
):
    """dX[row, cols] = g·(onehot − exp(x/T − lse))/T in dX's dtype; 0 at padded ids."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = cols < n_cols
    valid = inside & (vocab_start + cols < vocab_size)
    x = tl.load(X + row * stride_x + cols, mask=valid, other=float("-inf")).to(tl.float32)
    x = x / temperature
    lse = tl.load(LSE + row)
    g = tl.load(G + row)
    p = tl.exp(x - lse)
    tgt = tl.load(TGT + row) - vocab_start
    onehot = tl.where(valid & (cols == tgt), 1.0, 0.0)
    dx = g * (onehot - p) / temperature
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=inside)


def _merge(m: torch.Tensor, s: torch.Tensor, w: torch.Tensor | None, dim: int = -1):
    """Online-softmax merge of partial states along ``dim``: (M, S, W) with S = Σ s·e^{m−M} and
    W = Σ (w + (m − M)s)·e^{m−M}. Partials with m = −inf (all masked) contribute 0."""
    big = m.amax(dim, keepdim=True)
    shift, scale, delta = _rebase(m, big)
    S = (s * scale).sum(dim)
    W = None if w is None else ((w + delta * s) * scale).sum(dim)
    return big.squeeze(dim), S, W


def _rebase(m: torch.Tensor, big: torch.Tensor):
    big_safe = torch.where(torch.isneginf(big), torch.zeros_like(big), big)
    scale = torch.exp(m - big_safe)  # 0 where m = −inf
    delta = torch.where(torch.isneginf(m), torch.zeros_like(m), m - big_safe)
    return big_safe, scale, delta


def _tp_size(tp_group) -> int:
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(tp_group)


def _launch_config(n_rows: int, v_local: int, device: torch.device, block_v, num_splits):
    if block_v is None:
        block_v = min(4096 if device.type == "cuda" else 1024, triton.next_power_of_2(v_local))
    n_blocks = triton.cdiv(v_local, block_v)
    if num_splits is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            num_splits = triton.cdiv(4 * sms, max(n_rows, 1))
        else:
            num_splits = 1
    num_splits = max(1, min(int(num_splits), n_blocks))
    cols_per_split = triton.cdiv(n_blocks, num_splits) * block_v
    return block_v, cols_per_split, triton.cdiv(v_local, cols_per_split)


def _shard_stats(x2d, tgt, vocab_start, vocab_size, temperature, entropy, tp_group, block_v,
                 num_splits):
    """Per-row (lse, target logit/T, log S, W/S) over the whole (TP-merged) vocabulary."""
    n, v_local = x2d.shape
    block_v, cols_per_split, splits = _launch_config(n, v_local, x2d.device, block_v, num_splits)
    f32 = dict(device=x2d.device, dtype=torch.float32)
    m, s, t = (torch.empty(n, splits, **f32) for _ in range(3))
    w = torch.empty(n, splits, **f32) if entropy else s  # placeholder pointer when unused
    if n > 0:
        _logprob_stats_kernel[(n, splits)](
            x2d, x2d.stride(0), tgt, m, s, w, t, v_local, cols_per_split, splits, vocab_start,
            vocab_size, float(temperature), ENTROPY=entropy, BLOCK_V=block_v,
            num_warps=8 if block_v >= 2048 else 4,
        )
    m, s, w = _merge(m, s, w if entropy else None)
    t = t.amax(-1)
    if _tp_size(tp_group) > 1:
        mt = torch.stack([m, t])
        dist.all_reduce(mt, op=dist.ReduceOp.MAX, group=tp_group)
        big, t = mt[0], mt[1]
        _, scale, delta = _rebase(m, big)
        sw = torch.stack([s * scale] + ([] if w is None else [(w + delta * s) * scale]))
        dist.all_reduce(sw, op=dist.ReduceOp.SUM, group=tp_group)
        m, s = big, sw[0]
        w = sw[1] if entropy else None
    log_s = torch.log(s)
    lse = torch.where(torch.isneginf(m), m, m + log_s)
    return lse, t, log_s, (None if w is None else w / s)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp_group, vocab_start, vocab_size, temperature,
                return_entropy, block_v, num_splits):
        v_local = logits.shape[-1]
        x2d = logits.reshape(-1, v_local)
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        tgt = targets.reshape(-1).to(device=logits.device, dtype=torch.int64).contiguous()
        lse, t, log_s, w_over_s = _shard_stats(x2d, tgt, vocab_start, vocab_size, temperature,
                                               return_entropy, tp_group, block_v, num_splits)
        logp = (t - lse).reshape(targets.shape)
        ctx.save_for_backward(x2d, tgt, lse)
        ctx.args = (vocab_start, vocab_size, temperature, block_v, logits.shape)
        if not return_entropy:
            return logp
        entropy = (log_s - w_over_s).reshape(targets.shape)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, *_):
        x2d, tgt, lse = ctx.saved_tensors
        vocab_start, vocab_size, temperature, block_v, shape = ctx.args
        n, v_local = x2d.shape
        if block_v is None:
            block_v = min(1024, triton.next_power_of_2(v_local))
        dx = torch.empty((n, v_local), dtype=x2d.dtype, device=x2d.device)
        g = grad_logp.reshape(-1).to(torch.float32).contiguous()
        if n > 0:
            _logprob_grad_kernel[(n, triton.cdiv(v_local, block_v))](
                x2d, x2d.stride(0), dx, dx.stride(0), tgt, lse, g, v_local, vocab_start,
                vocab_size, float(temperature), BLOCK_V=block_v, num_warps=4,
            )
        return dx.reshape(shape), None, None, None, None, None, None, None, None


def vocab_parallel_logprobs_triton(logits, targets, tp_group=None, *, vocab_start=0,
                                   vocab_size=None, temperature=1.0, return_entropy=False,
                                   block_v=None, num_splits=None):
    """fp32 ``log softmax(logits/T)[targets]`` (and the detached entropy of ``softmax(logits/T)``
    if ``return_entropy``) from the local vocabulary shard ``logits`` [..., V_local] covering
    global ids ``[vocab_start, vocab_start + V_local)``; ids ≥ ``vocab_size`` are padding.
    ``tp_group`` None (or of size 1): this shard is the whole vocabulary. ``block_v`` and
    ``num_splits`` are launch knobs (columns per block, programs per row); None picks them."""
    if vocab_size is None:
        vocab_size = vocab_start + logits.shape[-1]
    return _VocabParallelLogprobs.apply(logits, targets, tp_group, int(vocab_start),
                                        int(vocab_size), float(temperature), bool(return_entropy),
                                        block_v, num_splits)
