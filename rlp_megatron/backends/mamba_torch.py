"""Pure-PyTorch Mamba-2 kernels for Megatron's ``MambaMixer`` without mamba-ssm / causal-conv1d.

The model is the discrete selective SSM of Mamba-2 (SSD), per head h with scalar decay A_h < 0:

    dt_t  = softplus(dt_raw_t + dt_bias)               (optionally clamped to dt_limit)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * B_t x_t^T   h: (headdim, d_state)
    y_t   = h_t C_t + D * x_t,   then  y_t *= silu(z_t)  when a gate z is given

preceded by a depthwise causal conv1d + silu over [x, B, C] and followed by a gated RMSNorm.

These references are exact (fp32 accumulation, no approximations), differentiable through autograd,
and written for clarity rather than speed.

:func:`install` points the names that ``megatron.core.ssm.mamba_mixer`` binds at import time to the
functions below and makes the mixer constructible without mamba-ssm. It keeps the real kernels when
mamba-ssm is importable and CUDA is available.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

_INSTALLED = False
_ROUTED = False


# ---------------------------------------------------------------------------------------------
# Chunked SSD scan


def _segsum(log_decay: torch.Tensor) -> torch.Tensor:
    """Pairwise decay exponents: out[..., i, j] = sum_{j<k<=i} log_decay[..., k]; -inf for j > i.

    Summing masked copies (instead of differencing a cumulative sum) keeps it exact when entries are
    large or -inf (the -inf marks a sequence boundary, see :func:`mamba_chunk_scan_combined`).
    """
    T = log_decay.size(-1)
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=log_decay.device).tril(-1)
    terms = log_decay[..., :, None].expand(*log_decay.shape, T).masked_fill(~strictly_lower, 0.0)
    out = terms.cumsum(dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=log_decay.device).tril(0)
    return out.masked_fill(~lower, float("-inf"))


def _process_dt(dt, dt_bias, dt_softplus, dt_limit, compute_dtype):
    dt = dt.to(compute_dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(compute_dtype)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, like the Triton kernels
    if dt_limit is not None and tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _heads_from_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(..., ngroups, n) -> (..., nheads, n): consecutive heads share a group."""
    return t.repeat_interleave(nheads // t.size(-2), dim=-2)


def _ssd_chunked(X, log_decay, B, C, chunk_size, initial_states):
    """Chunked SSD on padded inputs (length a multiple of chunk_size).

    X: (b, l, h, p) = dt * x; log_decay: (b, l, h) = dt * A; B, C: (b, l, h, n);
    initial_states: (b, h, p, n) or None. Returns y (b, l, h, p) and the final state (b, h, p, n).

    Within a chunk the SSM is a masked quadratic form (attention-like, mask = decays); across chunks
    only one state per chunk is carried, by a small recurrence over chunk totals.
    """
    b, l, h, p = X.shape
    n = B.size(-1)
    nc = l // chunk_size
    X, B, C = (t.reshape(b, nc, chunk_size, h, -1) for t in (X, B, C))
    a = log_decay.reshape(b, nc, chunk_size, h).permute(0, 3, 1, 2)  # (b, h, c, L)

    # 1. Outputs from inputs in the same chunk.
    seg = _segsum(a)  # (b, h, c, L, L)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * torch.exp(seg)
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, X)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(seg[..., -1, :])  # (b, h, c, L)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, X)

    # 3. Carry states across chunks: state entering chunk z, and the final state.
    if initial_states is None:
        initial_states = X.new_zeros(b, h, p, n)
    states = torch.cat([initial_states[:, None].to(X.dtype), chunk_states], dim=1)  # (b, c+1, ..)
    chunk_log_decay = F.pad(a.sum(-1), (1, 0))  # (b, h, c+1); a leading 0 for the initial state
    carried = torch.einsum("bhzc,bchpn->bzhpn", torch.exp(_segsum(chunk_log_decay)), states)
    entering, final_state = carried[:, :-1], carried[:, -1]

    # 4. Outputs from the state entering each chunk.
    decay_from_start = torch.exp(a.cumsum(-1))  # (b, h, c, L)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, decay_from_start)

    return (y_diag + y_off).reshape(b, l, h, p), final_state


def mamba_chunk_scan_combined(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    return_final_states=False,
    return_varlen_states=False,
    state_dtype=None,
):
    """Selective state-space scan, same contract as ``mamba_ssm.ops.triton.ssd_combined``.

    Algorithm: the minimal discrete SSD. Pad the sequence with dt = 0 (no decay, no input) to a
    multiple of ``chunk_size``, evaluate each chunk as a decay-masked quadratic form built from
    segment sums, and pass one state per chunk through a recurrence over the chunk totals.
    Everything is computed in fp32 (fp64 for fp64 inputs) and y is cast back to x's dtype.

    Shapes: x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), D (h,) or (h, p),
    z (b, l, h, p), dt_bias (h,), initial_states (b, h, p, n), seq_idx (b, l) int.
    Returns y, or (y, final_states) with ``return_final_states``; final states have
    ``state_dtype`` (default fp32, or fp64 for fp64 inputs).

    ``seq_idx`` (packed sequences) resets the state where it changes: the decay entering the first
    token of each sequence is set to -inf, which zeroes every earlier contribution.
    """
    if cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("varlen states are not implemented in the torch reference scan")
    batch, seqlen, nheads, _ = x.shape
    compute_dtype = torch.promote_types(x.dtype, torch.float32)

    dt = _process_dt(dt, dt_bias, dt_softplus, dt_limit, compute_dtype)
    xc = x.to(compute_dtype)
    X = xc * dt[..., None]
    log_decay = dt * A.to(compute_dtype)
    if seq_idx is not None:
        starts = torch.zeros_like(seq_idx, dtype=torch.bool)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        log_decay = log_decay.masked_fill(starts[..., None], float("-inf"))
    Bh = _heads_from_groups(B.to(compute_dtype), nheads)
    Ch = _heads_from_groups(C.to(compute_dtype), nheads)

    pad = (-seqlen) % chunk_size
    if pad:
        X, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, Bh, Ch))
        log_decay = F.pad(log_decay, (0, 0, 0, pad))
    if initial_states is not None:
        initial_states = initial_states.to(compute_dtype)
    y, final_states = _ssd_chunked(X, log_decay, Bh, Ch, chunk_size, initial_states)
    y = y[:, :seqlen]

    if D is not None:
        D = D.to(compute_dtype)
        y = y + xc * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))
    y = y.to(x.dtype)
    if return_final_states:
        return y, final_states.to(state_dtype or compute_dtype)
    return y


# ---------------------------------------------------------------------------------------------
# Decode step of the SSM


def selective_state_update(
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    state_batch_indices=None,
    intermediate_ssm_states=None,
):
    """SSM recurrence over a few new tokens, in place on ``state``.

    Same contract as ``megatron.core.ssm.ops.mamba_ssm.selective_state_update``. Per token t:
    dA = exp(A * dt_t), state = state * dA + dt_t * x_t B_t^T, y_t = state C_t + D x_t,
    y_t *= silu(z_t). Shapes (with heads): state (N, h, p, n); x, dt, z (b, [s,] h, p);
    A (h, p, n); B, C (b, [s,] g, n); D, dt_bias (h, p). Without heads the h axis is absent.
    ``state_batch_indices`` (b,) maps batch rows to state rows; a negative index marks a padding row
    (output 0, state untouched). ``intermediate_ssm_states`` (N, s, h, p, n) receives the state
    after every token. The state is accumulated in fp32 and written back once.
    """
    has_heads = state.dim() > 3
    if not has_heads:  # (N, d, n) -> one head of width d
        state_view = state.unsqueeze(1)
        x, dt, B, C = (t.unsqueeze(-2) for t in (x, dt, B, C))
        z = z.unsqueeze(-2) if z is not None else None
        A = A.unsqueeze(0)
        D = D.unsqueeze(0) if D is not None else None
        dt_bias = dt_bias.unsqueeze(0) if dt_bias is not None else None
        if intermediate_ssm_states is not None and intermediate_ssm_states.dim() == 4:
            intermediate_ssm_states = intermediate_ssm_states.unsqueeze(2)
    else:
        state_view = state
    single_token = x.dim() == 3
    if single_token:
        x, dt, B, C = (t.unsqueeze(1) for t in (x, dt, B, C))
        z = z.unsqueeze(1) if z is not None else None

    batch, seq_len, nheads, _ = x.shape
    f32 = torch.promote_types(x.dtype, torch.float32)
    rows = state_batch_indices
    rows = torch.arange(batch, device=x.device) if rows is None else rows.long()
    valid = rows >= 0
    safe_rows = rows.clamp(min=0)

    h = state_view[safe_rows].to(f32)  # (b, h, p, n)
    A = A.to(f32)
    outs = []
    for t in range(seq_len):
        dt_t = _process_dt(dt[:, t], dt_bias, dt_softplus, None, f32)  # (b, h, p)
        B_t = _heads_from_groups(B[:, t].to(f32), nheads)  # (b, h, n)
        C_t = _heads_from_groups(C[:, t].to(f32), nheads)
        x_t = x[:, t].to(f32)
        h = h * torch.exp(A * dt_t[..., None]) + (dt_t * x_t)[..., None] * B_t[:, :, None, :]
        if intermediate_ssm_states is not None:
            intermediate_ssm_states[safe_rows[valid], t] = h[valid].to(
                intermediate_ssm_states.dtype
            )
        y = torch.einsum("bhpn,bhn->bhp", h, C_t)
        if D is not None:
            y = y + x_t * D.to(f32)
        if z is not None:
            y = y * F.silu(z[:, t].to(f32))
        outs.append(y)
    out = torch.stack(outs, dim=1).masked_fill(~valid[:, None, None, None], 0.0).to(x.dtype)
    state_view[safe_rows[valid]] = h[valid].to(state.dtype)

    if single_token:
        out = out.squeeze(1)
    if not has_heads:
        out = out.squeeze(-2)
    return out


# ---------------------------------------------------------------------------------------------
# Causal depthwise conv1d


def _activate(y, activation):
    if activation in (None, False):
        return y
    if activation in (True, "silu", "swish"):
        return F.silu(y)
    raise ValueError(f"unsupported activation {activation!r}")


def causal_conv1d_fn(
    x,
    weight,
    bias=None,
    seq_idx=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
):
    """Depthwise causal conv1d, same contract as ``causal_conv1d.causal_conv1d_fn``.

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (W-1) + k]), where positions
    before the start read ``initial_states`` (b, d, W-1) (zeros by default). Implemented as an
    unfold of the left-extended input into width-W windows. With ``seq_idx`` (b, l), inputs from
    another sequence than the output token's are masked out. ``return_final_states`` also returns
    the last W-1 inputs, i.e. the initial states of a continuation.
    """
    if seq_idx is not None and initial_states is not None:
        raise ValueError("initial_states and seq_idx cannot be combined")
    batch, dim, seqlen = x.shape
    width = weight.size(-1)
    if initial_states is None:
        initial_states = x.new_zeros(batch, dim, width - 1)
    extended = torch.cat([initial_states.to(x.dtype), x], dim=-1)  # (b, d, W-1+l)
    windows = extended.unfold(-1, width, 1)  # (b, d, l, W)
    if seq_idx is not None:
        idx = F.pad(seq_idx, (width - 1, 0), value=-1).unfold(-1, width, 1)  # (b, l, W)
        same_seq = idx == seq_idx[..., None]
        windows = windows * same_seq[:, None].to(x.dtype)
    out = (windows * weight[:, None, :].to(x.dtype)).sum(-1)
    if bias is not None:
        out = out + bias[:, None].to(x.dtype)
    out = _activate(out, activation)
    if not return_final_states:
        return out
    final_states = extended[..., extended.size(-1) - (width - 1):]
    if final_states_out is not None:
        final_states_out.copy_(final_states)
        final_states = final_states_out
    return out, final_states


def causal_conv1d_update(
    x,
    conv_state,
    weight,
    bias,
    silu_activation,
    conv_state_indices,
    intermediate_conv_states=None,
):
    """Causal conv1d over a few new tokens, in place on the rolling ``conv_state``.

    Same contract as ``megatron.core.ssm.ops.causal_conv1d_triton.causal_conv1d_update``:
    x (b, d) or (b, s, d); conv_state (N, d, state_len) holds the last state_len inputs. Per token:
    shift the state left by one, append the token, out = act(bias + sum(weight * last W entries)).
    ``conv_state_indices`` (b,) maps batch rows to state rows (negative = padding row: output 0).
    ``intermediate_conv_states`` (N, s, d, state_len) receives the state after every token.
    """
    single_token = x.dim() == 2
    if single_token:
        x = x.unsqueeze(1)
    batch, seq_len, _ = x.shape
    width = weight.size(-1)
    f32 = torch.promote_types(x.dtype, torch.float32)
    rows = conv_state_indices
    rows = torch.arange(batch, device=x.device) if rows is None else rows.long()
    valid = rows >= 0
    safe_rows = rows.clamp(min=0)

    window = conv_state[safe_rows]  # (b, d, state_len), in the state's dtype like the kernel
    outs = []
    for t in range(seq_len):
        window = torch.cat([window[..., 1:], x[:, t, :, None].to(window.dtype)], dim=-1)
        if intermediate_conv_states is not None:
            intermediate_conv_states[safe_rows[valid], t] = window[valid].to(
                intermediate_conv_states.dtype
            )
        y = (window[..., -width:].to(f32) * weight.to(f32)).sum(-1)
        if bias is not None:
            y = y + bias.to(f32)
        outs.append(_activate(y, silu_activation))
    out = torch.stack(outs, dim=1).masked_fill(~valid[:, None, None], 0.0).to(x.dtype)
    conv_state[safe_rows[valid]] = window[valid]
    return out.squeeze(1) if single_token else out


# ---------------------------------------------------------------------------------------------
# Gated RMSNorm


def rms_norm_gated(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """RMSNorm over groups of ``group_size`` channels, gated by silu(z) before or after the norm.

    norm_before_gate: out = rmsnorm(x) * w * silu(z); otherwise out = rmsnorm(x * silu(z)) * w.
    Computed in fp32, returned in x's dtype.
    """
    dtype = x.dtype
    f32 = torch.promote_types(dtype, torch.float32)
    x = x.to(f32)
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.to(f32))
    group_size = group_size or x.size(-1)
    groups = x.unflatten(-1, (-1, group_size))
    groups = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)
    out = groups.flatten(-2) * weight.to(f32)
    if bias is not None:
        out = out + bias.to(f32)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(f32))
    return out.to(dtype)


class RMSNormGated(nn.Module):
    """Torch twin of ``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` (state dict: ``weight``)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None,
                 dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        return rms_norm_gated(x, self.weight, self.bias, z=z, eps=self.eps,
                              group_size=self.group_size, norm_before_gate=self.norm_before_gate)


def _extended_rmsnorm_class(mixer_module):
    """Rebuild the mixer's ``ExtendedRMSNorm`` on top of :class:`RMSNormGated`.

    Without mamba-ssm the mixer binds ``RMSNormGated = MagicMock()`` and ``class ExtendedRMSNorm(
    RMSNormGated)`` then evaluates to ``MagicMock(name, bases, namespace)``: a mock whose
    return_value is the class namespace. We reuse that namespace (Megatron's own
    ``sharded_state_dict``, TP-sharded along axis 0) so checkpoints match a GPU run exactly.
    """
    current = mixer_module.ExtendedRMSNorm
    if isinstance(current, type) and issubclass(current, RMSNormGated):
        return current
    namespace = getattr(current, "_mock_return_value", None)
    if not (isinstance(namespace, dict) and "sharded_state_dict" in namespace):
        namespace = dict(vars(current)) if isinstance(current, type) else {}
    namespace = {k: v for k, v in namespace.items() if k not in ("__dict__", "__weakref__")}
    if "sharded_state_dict" not in namespace:
        raise RuntimeError("cannot recover ExtendedRMSNorm.sharded_state_dict from mamba_mixer")
    namespace.setdefault("__module__", mixer_module.__name__)
    return type("ExtendedRMSNorm", (RMSNormGated,), namespace)


# ---------------------------------------------------------------------------------------------
# Wiring into Megatron


def _real_kernels_usable(mixer_module) -> bool:
    return bool(mixer_module.HAVE_MAMBA_SSM) and torch.cuda.is_available()


def _force_unfused_path(mixer_cls):
    """Make every MambaMixer take the unfused path (conv1d, then the chunk scan, then the norm).

    The fused ``mamba_split_conv1d_scan_combined`` (taken when ``config.use_mamba_mem_eff_path``)
    exists only as a CUDA kernel; the unfused path computes the same function from the kernels
    above.
    Set on the instance rather than the config so a shared config object is left untouched.
    """
    original_init = mixer_cls.__init__
    if getattr(original_init, "_rlp_unfused", False):
        return

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.use_mem_eff_path = False

    __init__._rlp_unfused = True
    mixer_cls.__init__ = __init__


def _fix_static_batch_decode(mixer_cls):
    """Static-batching decode with batch > 1: feed ``_ssm_decode`` (b, 1, d), not (1, b, d).

    Since megatron-core 0.17 ``_ssm_decode`` takes (batch, seq, d), but ``_decode`` still hands it
    the (1, batch, d) output of in_proj when batching is static, so a batch of b prompts is decoded
    as one sequence of b tokens through state row 0 (with the Triton kernels too; our kernels just
    follow the same contract). Kernel-independent, so applied whether or not the kernels are routed.
    """
    original_decode = mixer_cls._decode
    if getattr(original_decode, "_rlp_static_fix", False):
        return

    @functools.wraps(original_decode)
    def _decode(self, hidden_states, conv_state, ssm_state, batch_indices=None):
        if batch_indices is not None:  # dynamic batching: upstream handles the layout
            return original_decode(self, hidden_states, conv_state, ssm_state, batch_indices)
        assert hidden_states.shape[0] == 1, "Only support decoding with 1 token at a time for now"
        assert self.cp.cp_size == 1, "Context parallel not supported for Mamba inference decode"
        zxBCdt, _ = self.in_proj(hidden_states)  # (1, b, d)
        y = self._ssm_decode(zxBCdt.transpose(0, 1), conv_state=conv_state, ssm_state=ssm_state)
        return self.out_proj(y.transpose(0, 1))

    _decode._rlp_static_fix = True
    mixer_cls._decode = _decode


def _no_sequence_packing(for_inference_not_training: bool = True):
    """Replaces the mixer's version probe of mamba-ssm / causal-conv1d (which would ImportError)."""
    return False, (
        "dynamic-batching inference and packed-sequence training of Mamba layers need the "
        "mamba-ssm and causal-conv1d kernels; the torch fallback "
        "(rlp_megatron.backends.mamba_torch) supports training and StaticInferenceContext decode"
    )


def install() -> bool:
    """Route Megatron's Mamba mixer to the torch kernels above; returns True when routed.

    Patches the names bound in ``megatron.core.ssm.mamba_mixer``:
      * ``mamba_chunk_scan_combined``, ``causal_conv1d_fn``, ``RMSNormGated`` / ``ExtendedRMSNorm``
        (from mamba-ssm / causal-conv1d) -> torch versions;
      * ``selective_state_update``, ``causal_conv1d_update`` (Megatron's Triton decode kernels)
        -> torch versions, only when CUDA is unavailable (Triton cannot run on CPU tensors);
      * ``HAVE_MAMBA_SSM = True`` so the mixer constructs, and ``MAMBA_HAS_STATE_DTYPE = True``
        since our scan accepts ``state_dtype``;
      * ``_check_mamba_sequence_packing_support`` -> "unsupported" with a message that says so, in
        place of an ImportError from its version probe;
      * ``MambaMixer.__init__`` forces the unfused path (see :func:`_force_unfused_path`).
    Keeps the real kernels (routes nothing) when mamba-ssm is importable and CUDA is available.
    Independently of the kernels, ``MambaMixer._decode`` gets an upstream bug fix for static
    batching with batch > 1 (see :func:`_fix_static_batch_decode`). Idempotent. The
    dynamic-batching inference path (varlen conv/scan, Triton tensor ops) is not routed.
    """
    global _INSTALLED, _ROUTED
    if _INSTALLED:
        return _ROUTED
    from megatron.core.ssm import mamba_mixer

    _fix_static_batch_decode(mamba_mixer.MambaMixer)
    _INSTALLED = True
    if _real_kernels_usable(mamba_mixer):
        return False
    mamba_mixer.ExtendedRMSNorm = _extended_rmsnorm_class(mamba_mixer)
    mamba_mixer.RMSNormGated = RMSNormGated
    mamba_mixer.mamba_chunk_scan_combined = mamba_chunk_scan_combined
    mamba_mixer.causal_conv1d_fn = causal_conv1d_fn
    mamba_mixer.HAVE_MAMBA_SSM = True
    mamba_mixer.MAMBA_HAS_STATE_DTYPE = True
    mamba_mixer._check_mamba_sequence_packing_support = _no_sequence_packing
    if not torch.cuda.is_available():
        mamba_mixer.selective_state_update = selective_state_update
        mamba_mixer.causal_conv1d_update = causal_conv1d_update
    _force_unfused_path(mamba_mixer.MambaMixer)
    _ROUTED = True
    return True
