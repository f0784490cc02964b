"""Chunked PyTorch log-prob kernels: the reference implementation, and the CPU path.

Both functions return log softmax(z / T)[target] (and, on request, the entropy of softmax(z / T))
for vocab-parallel logits z, each TP rank holding the ids ``[vocab_start, vocab_start + V_local)``:

* nothing of size [tokens × V] ever crosses the TP group: each rank reduces its shard to three
  numbers per token (max, Σ exp, Σ exp·z, relative to its own max) plus the target's logit on its
  owning shard; one MAX and one SUM all-reduce merge them as an online softmax does;
* every product and sum is in fp32 whatever the input dtype, so a log-prob's error is fp32
  accumulation on the given inputs, not bf16 rounding of the logits: on CPU bf16 tiles are upcast;
  on CUDA the logit GEMMs take the bf16 operands with an fp32 output (``torch.mm(...,
  out_dtype=torch.float32)``: tensor cores, products of two bf16 numbers exact in fp32, fp32
  sums), not an fp32 GEMM on upcast copies;
* the entropy accumulates Σ p·(z − max), relative to the running max, so no two ~30-nat numbers
  cancel;
* ids ≥ ``vocab_size`` (Megatron's vocabulary padding) are −inf: they are not part of the
  distribution that samples or scores;
* :func:`fused_linear_logprobs_torch` starts from the hidden states and the output weight shard and
  never materialises the [tokens × V_local] logits: tokens are processed ``chunk_size`` at a time,
  the vocabulary shard ``vocab_chunk`` rows at a time (an online log-sum-exp across tiles), and the
  backward recomputes each tile. Its backward returns the hidden states' gradient all-reduced over
  TP (the full gradient: every shard's contribution) and this shard's weight gradient, both
  accumulated in fp32 from the fp32 gradient of the logits and rounded once to the parameters'
  dtype. (Megatron's bf16 output layer rounds the logits' gradient to bf16 first; on a GPU those
  two GEMMs are fp32 GEMMs here, a cost measured by the GPU check kit, not yet optimised.)

The entropy output is for selection and logging: it carries no gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_VOCAB_CHUNK = 16384
_TILE_ELEMENTS = 1 << 24  # fp32 working set of one tile: 64 MiB
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_OUT_DTYPE_MM = [True]  # torch.mm(..., out_dtype=) works here (CUDA); cleared on first failure


def fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b [n, k] @ [k, m] with fp32 products and sums and an fp32 result, for any input dtypes
    (bf16/fp16 CUDA operands stay in their dtype: tensor cores with an fp32 output)."""
    if (a.is_cuda and a.dtype == b.dtype and a.dtype in _LOW_PRECISION and _OUT_DTYPE_MM[0]):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (NotImplementedError, RuntimeError, TypeError):
            _OUT_DTYPE_MM[0] = False
    return a.float() @ b.float()


def _rows_per_tile(columns: int) -> int:
    return max(1, _TILE_ELEMENTS // max(1, columns))


def _tp_size(group) -> int:
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


def _tile_logits(x: torch.Tensor, start: int, vocab_start: int, vocab_size: int | None,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 z / T of a [n, v] tile whose first column is global id ``vocab_start + start``;
    padded ids at −inf. Returns (tile, padding mask or None)."""
    z = x.float()
    if temperature != 1.0:
        z = z / temperature
    pad = None
    first = vocab_start + start
    if vocab_size is not None and first + z.shape[-1] > vocab_size:
        ids = torch.arange(first, first + z.shape[-1], device=z.device)
        pad = ids >= vocab_size
        z = z.masked_fill(pad, float("-inf"))
    return z, pad


class _Partial:
    """Per-token running statistics of one shard (an online softmax): max m, s = Σ exp(z − m),
    t = Σ exp(z − m)·(z − m) and the target's z (0 where the target is not in the shard)."""

    def __init__(self, n: int, device, entropy: bool):
        self.m = torch.full((n,), float("-inf"), device=device)
        self.s = torch.zeros(n, device=device)
        self.t = torch.zeros(n, device=device) if entropy else None
        self.target = torch.zeros(n, device=device)

    def add(self, rows: slice, z: torch.Tensor, pad, local_target: torch.Tensor):
        """Merge the tile z [n, v] (columns 0..v-1 ↔ local ids ``local_target`` is relative to)."""
        m_old = self.m[rows]
        m_new = torch.maximum(m_old, z.max(dim=-1).values)
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        scale = torch.exp(m_old - safe)  # 0 where nothing was seen yet
        e = torch.exp(z - safe[:, None])
        if self.t is not None:
            zc = z - safe[:, None]
            zc = zc if pad is None else zc.masked_fill(pad, 0.0)
            self.t[rows] = _rebase(self.t[rows], self.s[rows], m_old, safe, scale) + (e * zc).sum(-1)
        self.s[rows] = self.s[rows] * scale + e.sum(dim=-1)
        self.m[rows] = m_new
        inside = (local_target >= 0) & (local_target < z.shape[-1])
        picked = z.gather(-1, local_target.clamp(0, z.shape[-1] - 1)[:, None])[:, 0]
        self.target[rows] += torch.where(inside, picked, torch.zeros_like(picked))

    def merge(self, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log-sum-exp, target z, entropy or None) over the whole vocabulary."""
        m = self.m.clone()
        if _tp_size(group) > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        scale = torch.where(torch.isfinite(self.m), torch.exp(self.m - m), torch.zeros_like(m))
        parts = [self.s * scale, self.target]
        if self.t is not None:
            parts.append(_rebase(self.t, self.s, self.m, m, scale))
        stacked = torch.stack(parts)
        if _tp_size(group) > 1:
            dist.all_reduce(stacked, group=group)
        s, target = stacked[0], stacked[1]
        lse = m + torch.log(s)
        entropy = torch.log(s) - stacked[2] / s if self.t is not None else None
        return lse, target, entropy


def _rebase(t, s, m_old, m_new, scale):
    """Σ exp(z − m_new)(z − m_new) from t = Σ exp(z − m_old)(z − m_old) and s = Σ exp(z − m_old):
    scale · (t + (m_old − m_new) · s), with scale = exp(m_old − m_new); 0 where nothing was seen."""
    shift = torch.where(torch.isfinite(m_old), m_old - m_new, torch.zeros_like(m_old))
    return scale * (t + shift * s)


def _chunks(n: int, size: int):
    size = max(1, int(size))
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, vocab_size, temperature, entropy,
                chunk_size):
        v_local = logits.shape[-1]
        x = logits.reshape(-1, v_local)
        tgt = targets.reshape(-1) - vocab_start
        chunk_size = chunk_size or _rows_per_tile(v_local)
        stats = _Partial(x.shape[0], x.device, entropy)
        for rows in _chunks(x.shape[0], chunk_size):
            z, pad = _tile_logits(x[rows], 0, vocab_start, vocab_size, temperature)
            stats.add(rows, z, pad, tgt[rows])
        lse, target_z, entropy_ = stats.merge(group)
        ctx.save_for_backward(logits, tgt, lse)
        ctx.cfg = (vocab_start, vocab_size, temperature, chunk_size)
        return _outputs(ctx, target_z - lse, entropy_, targets.shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, tgt, lse = ctx.saved_tensors
        vocab_start, vocab_size, temperature, chunk_size = ctx.cfg
        v_local = logits.shape[-1]
        x = logits.reshape(-1, v_local)
        g = grad_logp.reshape(-1).float()
        grad = torch.empty_like(x)
        for rows in _chunks(x.shape[0], chunk_size):
            grad[rows] = _grad_logits(x[rows], 0, tgt[rows], lse[rows], g[rows], vocab_start,
                                      vocab_size, temperature).to(grad.dtype)
        return grad.reshape(logits.shape), None, None, None, None, None, None, None


def _outputs(ctx, logp, entropy, shape):
    """logp, or (logp, entropy) with the entropy marked as having no gradient."""
    if entropy is None:
        return logp.reshape(shape)
    entropy = entropy.reshape(shape)
    ctx.mark_non_differentiable(entropy)
    return logp.reshape(shape), entropy


def _grad_logits(x, start, local_target, lse, g, vocab_start, vocab_size, temperature):
    """d logp / d x for a tile: g · (onehot(target) − softmax(z / T)) / T, in fp32."""
    z, _ = _tile_logits(x, start, vocab_start, vocab_size, temperature)
    d = -torch.exp(z - lse[:, None])
    col = local_target - start
    inside = (col >= 0) & (col < z.shape[-1])
    d.scatter_add_(-1, col.clamp(0, z.shape[-1] - 1)[:, None], inside.float()[:, None])
    d *= g[:, None]
    if temperature != 1.0:
        d /= temperature
    return d


def vocab_parallel_logprobs_torch(logits, targets, tp_group=None, *, vocab_start=0,
                                  vocab_size=None, temperature=1.0, return_entropy=False,
                                  chunk_size=None):
    """log softmax(logits / T)[targets] (fp32, shape of ``targets``) from this rank's vocab shard
    ``logits`` [..., V_local]; with ``return_entropy``, also the entropy (no gradient).
    ``chunk_size`` rows per fp32 tile (default: a 64 MiB tile)."""
    return _VocabParallelLogprobs.apply(logits, targets, tp_group, vocab_start, vocab_size,
                                        float(temperature), bool(return_entropy), chunk_size)


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, group, vocab_start, vocab_size, temperature,
                entropy, chunk_size, vocab_chunk):
        h = hidden.reshape(-1, hidden.shape[-1])
        tgt = targets.reshape(-1) - vocab_start
        stats = _Partial(h.shape[0], h.device, entropy)
        for rows in _chunks(h.shape[0], chunk_size):
            hc = h[rows]
            for cols in _chunks(weight.shape[0], vocab_chunk):
                z, pad = _tile_logits(fp32_matmul(hc, weight[cols].T), cols.start, vocab_start,
                                      vocab_size, temperature)
                stats.add(rows, z, pad, tgt[rows] - cols.start)
        lse, target_z, entropy_ = stats.merge(group)
        ctx.save_for_backward(hidden, weight, tgt, lse)
        ctx.cfg = (group, vocab_start, vocab_size, temperature, chunk_size, vocab_chunk)
        return _outputs(ctx, target_z - lse, entropy_, targets.shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, tgt, lse = ctx.saved_tensors
        group, vocab_start, vocab_size, temperature, chunk_size, vocab_chunk = ctx.cfg
        h = hidden.reshape(-1, hidden.shape[-1])
        g = grad_logp.reshape(-1).float()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        # Vocabulary tiles outside: the fp32 copy of a weight tile (for the two gradient GEMMs,
        # whose other operand is the fp32 gradient of the logits) is made once per tile.
        for cols in _chunks(weight.shape[0], vocab_chunk):
            w = weight[cols]
            w32 = w.float()
            for rows in _chunks(h.shape[0], chunk_size):
                hc = h[rows]
                d = _grad_logits(fp32_matmul(hc, w.T), cols.start, tgt[rows], lse[rows], g[rows],
                                 vocab_start, vocab_size, temperature)
                if need_h:
                    grad_h[rows] += d @ w32
                if need_w:
                    grad_w[cols] += fp32_matmul(d.T, hc)
                del d
        if need_h and _tp_size(group) > 1:
            dist.all_reduce(grad_h, group=group)  # every shard's share of d logp / d hidden
        return (grad_h.to(hidden.dtype).reshape(hidden.shape) if need_h else None,
                grad_w.to(weight.dtype) if need_w else None,
                None, None, None, None, None, None, None, None)


def fused_linear_logprobs_torch(hidden, weight, targets, tp_group=None, *, chunk_size=1024,
                                vocab_start=0, vocab_size=None, temperature=1.0,
                                return_entropy=False, vocab_chunk=_VOCAB_CHUNK):
    """:func:`vocab_parallel_logprobs_torch` of ``hidden @ weight.T`` (``hidden`` [..., H],
    ``weight`` [V_local, H]) without materialising the logits."""
    return _FusedLinearLogprobs.apply(hidden, weight, targets, tp_group, vocab_start, vocab_size,
                                      float(temperature), bool(return_entropy), chunk_size,
                                      vocab_chunk)
