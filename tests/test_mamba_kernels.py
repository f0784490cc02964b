"""The torch Mamba kernels equal a naive step-by-step recurrence, and a real Megatron hybrid model
built from ``hybrid_local_stack_spec`` trains and decodes on CPU (KV/SSM-cache decode equals
teacher forcing)."""

import os

import pytest
import torch
import torch.nn.functional as F

import rlp_megatron  # noqa: F401  (enables the CPU backend before any Megatron model code runs)
from rlp_megatron.backends import mamba_torch as mt

from harness import tiny_hybrid  # noqa: E402  (the model_parallel fixture: conftest.py)

torch.set_num_threads(1)
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Naive references: one token at a time, written from the SSM definition.


def naive_ssm(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, initial_state=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t;  y_t = C_t h_t + D x_t;  y_t *= silu(z_t)."""
    batch, seqlen, nheads, headdim = x.shape
    heads_per_group = nheads // B.size(2)
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    h = torch.zeros(batch, nheads, headdim, B.size(-1), dtype=x.dtype)
    if initial_state is not None:
        h = initial_state.clone()
    ys = []
    for t in range(seqlen):
        h_heads, y_heads = [], []
        for head in range(nheads):
            g = head // heads_per_group
            d = dt[:, t, head, None, None]
            h_head = torch.exp(d * A[head]) * h[:, head] + d * (
                x[:, t, head, :, None] * B[:, t, g, None, :]
            )
            y_head = (h_head * C[:, t, g, None, :]).sum(-1)
            if D is not None:
                y_head = y_head + D[head] * x[:, t, head]
            h_heads.append(h_head)
            y_heads.append(y_head)
        h = torch.stack(h_heads, dim=1)
        y_t = torch.stack(y_heads, dim=1)
        if z is not None:
            y_t = y_t * F.silu(z[:, t])
        ys.append(y_t)
    return torch.stack(ys, dim=1), h


def naive_conv(x, weight, bias=None, initial_states=None, silu=True):
    """out[b, d, t] = act(bias[d] + sum_k w[d, k] * x[b, d, t - W + 1 + k]) with explicit loops."""
    batch, dim, seqlen = x.shape
    width = weight.size(-1)
    history = initial_states if initial_states is not None else torch.zeros(batch, dim, width - 1)
    full = torch.cat([history, x], dim=-1)
    out = torch.zeros(batch, dim, seqlen, dtype=x.dtype)
    for t in range(seqlen):
        for k in range(width):
            out[:, :, t] += weight[:, k] * full[:, :, t + k]
    if bias is not None:
        out += bias[:, None]
    return F.silu(out) if silu else out


def ssm_inputs(batch=2, seqlen=37, nheads=4, headdim=3, ngroups=2, dstate=5, dtype=torch.float32,
               seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        x=r(batch, seqlen, nheads, headdim),
        dt=r(batch, seqlen, nheads) * 0.5,
        A=-torch.exp(r(nheads) * 0.5),
        B=r(batch, seqlen, ngroups, dstate),
        C=r(batch, seqlen, ngroups, dstate),
        D=r(nheads),
        z=r(batch, seqlen, nheads, headdim),
        dt_bias=r(nheads) * 0.5,
        initial_state=r(batch, nheads, headdim, dstate),
    )


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Kernels


@pytest.mark.parametrize("chunk_size,seqlen", [(8, 37), (16, 50), (64, 100), (16, 5)])
def test_chunk_scan_matches_recurrence(chunk_size, seqlen):
    inp = ssm_inputs(seqlen=seqlen)
    y_ref, h_ref = naive_ssm(**inp)
    y, h = mt.mamba_chunk_scan_combined(
        inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size, D=inp["D"], z=inp["z"],
        dt_bias=inp["dt_bias"], dt_softplus=True, initial_states=inp["initial_state"],
        return_final_states=True,
    )
    print(f"chunk {chunk_size} len {seqlen}: "
          f"y {max_diff(y, y_ref):.2e} state {max_diff(h, h_ref):.2e}")
    assert max_diff(y, y_ref) < ATOL
    assert max_diff(h, h_ref) < ATOL


def test_chunk_scan_without_optional_inputs_and_headdim_D():
    inp = ssm_inputs(seqlen=21)
    D, dt = torch.randn(4, 3), inp["dt"].abs()  # dt > 0 as after softplus
    y_ref, h_ref = naive_ssm(inp["x"], dt, inp["A"], inp["B"], inp["C"], D=D, dt_softplus=False)
    y, h = mt.mamba_chunk_scan_combined(inp["x"], dt, inp["A"], inp["B"], inp["C"], 8, D=D,
                                        return_final_states=True)
    assert max_diff(y, y_ref) < ATOL and max_diff(h, h_ref) < ATOL
    y = mt.mamba_chunk_scan_combined(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 8)
    assert y.shape == inp["x"].shape


def test_chunk_scan_seq_idx_restarts_state_at_boundaries():
    inp = ssm_inputs(batch=1, seqlen=30)
    seq_idx = torch.tensor([[0] * 7 + [1] * 13 + [2] * 10])
    keys = ("x", "dt", "B", "C", "z")
    y = mt.mamba_chunk_scan_combined(
        inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 8, D=inp["D"], z=inp["z"],
        dt_bias=inp["dt_bias"], dt_softplus=True, seq_idx=seq_idx,
    )
    for lo, hi in [(0, 7), (7, 20), (20, 30)]:
        part = {k: inp[k][:, lo:hi] for k in keys}
        y_ref, _ = naive_ssm(A=inp["A"], D=inp["D"], dt_bias=inp["dt_bias"], **part)
        assert max_diff(y[:, lo:hi], y_ref) < ATOL


def test_chunk_scan_gradients():
    inp = ssm_inputs(batch=1, seqlen=11, nheads=2, headdim=2, ngroups=1, dstate=3,
                     dtype=torch.float64)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]
    leaves = [inp[n].clone().requires_grad_() for n in names]

    def scan(*args):
        kw = dict(zip(names, args))
        return mt.mamba_chunk_scan_combined(
            kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], 4, D=kw["D"], z=kw["z"],
            dt_bias=kw["dt_bias"], dt_softplus=True, initial_states=kw["initial_state"],
            return_final_states=True,
        )

    assert torch.autograd.gradcheck(scan, leaves)

    # fp32 gradients equal those of the naive recurrence
    inp = ssm_inputs(seqlen=19)
    ours = {n: inp[n].clone().requires_grad_() for n in names}
    ref = {n: inp[n].clone().requires_grad_() for n in names}
    y, h = scan(*[ours[n] for n in names])
    y_ref, h_ref = naive_ssm(**ref)
    g = torch.Generator().manual_seed(4)
    w_y, w_h = torch.randn(y.shape, generator=g), torch.randn(h.shape, generator=g)
    ((y * w_y).sum() + (h * w_h).sum()).backward()
    ((y_ref * w_y).sum() + (h_ref * w_h).sum()).backward()
    worst = max(max_diff(ours[n].grad, ref[n].grad) for n in names)
    print(f"grad max abs diff vs naive: {worst:.2e}")
    assert worst < 1e-4


def test_causal_conv1d_matches_loops():
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*s, generator=g) for s in [(2, 6, 13), (6, 4), (6,)])
    init = torch.randn(2, 6, 3, generator=g)
    out = mt.causal_conv1d_fn(x, w, b, activation="silu")
    assert max_diff(out, naive_conv(x, w, b)) < ATOL
    out, final = mt.causal_conv1d_fn(x, w, b, initial_states=init, return_final_states=True,
                                     activation="silu")
    print(f"conv max abs diff: {max_diff(out, naive_conv(x, w, b, init)):.2e}")
    assert max_diff(out, naive_conv(x, w, b, init)) < ATOL
    assert torch.equal(final, x[..., -3:])
    # a continuation from the final states equals one pass over the concatenation
    x2 = torch.randn(2, 6, 5, generator=g)
    out2 = mt.causal_conv1d_fn(x2, w, b, initial_states=final, activation="silu")
    whole = mt.causal_conv1d_fn(torch.cat([x, x2], -1), w, b, initial_states=init,
                                activation="silu")
    assert max_diff(out2, whole[..., -5:]) < ATOL
    # seq_idx: packed sequences do not see each other
    seq_idx = torch.tensor([[0] * 6 + [1] * 7] * 2)
    packed = mt.causal_conv1d_fn(x, w, b, seq_idx=seq_idx, activation="silu")
    assert max_diff(packed[..., 6:], naive_conv(x[..., 6:], w, b)) < ATOL
    # matches Megatron's own torch fallback (F.conv1d with padding)
    fallback = F.silu(F.conv1d(x, w[:, None], b, padding=3, groups=6)[..., :13])
    assert max_diff(mt.causal_conv1d_fn(x, w, b, activation="silu"), fallback) < ATOL


def test_causal_conv1d_update_matches_full_conv():
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*s, generator=g) for s in [(3, 5, 9), (5, 4), (5,)])
    full = naive_conv(x, w, b)
    state = torch.zeros(3, 5, 4)
    steps = [mt.causal_conv1d_update(x[:, :, t], state, w, b, "silu", None) for t in range(9)]
    print(f"conv update max abs diff: {max_diff(torch.stack(steps, -1), full):.2e}")
    assert max_diff(torch.stack(steps, -1), full) < ATOL
    assert torch.equal(state, x[:, :, -4:])
    # multi-token update through state indices (row 1 is padding), with per-token states
    state = torch.zeros(4, 5, 4)
    inter = torch.zeros(4, 9, 5, 4)
    idx = torch.tensor([2, -1, 0])
    out = mt.causal_conv1d_update(x.transpose(1, 2), state, w, b, "silu", idx, inter)
    assert max_diff(out[0], full[0].T) < ATOL and max_diff(out[2], full[2].T) < ATOL
    assert out[1].abs().max() == 0 and state[1].abs().max() == 0 and state[3].abs().max() == 0
    assert torch.equal(inter[2, -1], x[0, :, -4:])


def test_selective_state_update_matches_recurrence():
    inp = ssm_inputs(seqlen=6)
    x, dt, A, B, C, D, z, dt_bias = (inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z",
                                                      "dt_bias"))
    y_ref, h_ref = naive_ssm(**inp)
    p, n = x.size(-1), B.size(-1)
    # Megatron's call: A, dt, dt_bias, D expanded over headdim (stride-0 views)
    A_full = A[:, None, None].expand(-1, p, n)
    state = inp["initial_state"].clone()
    ys = [
        mt.selective_state_update(
            state, x[:, t], dt[:, t, :, None].expand(-1, -1, p), A_full, B[:, t], C[:, t],
            D[:, None].expand(-1, p), z=z[:, t], dt_bias=dt_bias[:, None].expand(-1, p),
            dt_softplus=True,
        )
        for t in range(6)
    ]
    print(f"state update max abs diff: {max_diff(torch.stack(ys, 1), y_ref):.2e}")
    assert max_diff(torch.stack(ys, 1), y_ref) < ATOL
    assert max_diff(state, h_ref) < ATOL
    # all tokens at once, with batch indices and intermediate states
    state = torch.zeros(3, *inp["initial_state"].shape[1:])
    state[[2, 0]] = inp["initial_state"]
    inter = torch.zeros(3, 6, *state.shape[1:])
    y = mt.selective_state_update(
        state, x, dt[..., None].expand(-1, -1, -1, p), A_full, B, C, D[:, None].expand(-1, p),
        z=z, dt_bias=dt_bias[:, None].expand(-1, p), dt_softplus=True,
        state_batch_indices=torch.tensor([2, 0]), intermediate_ssm_states=inter,
    )
    assert max_diff(y, y_ref) < ATOL
    assert max_diff(state[[2, 0]], h_ref) < ATOL and state[1].abs().max() == 0
    assert torch.equal(inter[[2, 0], -1], state[[2, 0]])
    # head-less layout (Mamba-1 style): state (b, d, n), one token
    state = inp["initial_state"][:, 0].clone()
    y = mt.selective_state_update(
        state, x[:, 0, 0], dt[:, 0, :1].expand(-1, p), A_full[0], B[:, 0, 0], C[:, 0, 0],
        D[0].expand(p), z=z[:, 0, 0], dt_bias=dt_bias[:1].expand(p), dt_softplus=True,
    )
    y_ref, h_ref = naive_ssm(x[:, :1, :1], dt[:, :1, :1], A[:1], B[:, :1, :1], C[:, :1, :1],
                             D=D[:1], z=z[:, :1, :1], dt_bias=dt_bias[:1],
                             initial_state=inp["initial_state"][:, :1])
    assert max_diff(y, y_ref[:, 0, 0]) < ATOL and max_diff(state, h_ref[:, 0]) < ATOL


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_rmsnorm_gated(norm_before_gate):
    x, z = torch.randn(3, 7, 12), torch.randn(3, 7, 12)
    norm = mt.RMSNormGated(12, eps=1e-5, group_size=4, norm_before_gate=norm_before_gate)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12))
    gated = x * F.silu(z) if not norm_before_gate else x
    groups = gated.view(3, 7, 3, 4)
    ref = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).view(3, 7, 12)
    ref = ref * norm.weight
    if norm_before_gate:
        ref = ref * F.silu(z)
    assert max_diff(norm(x, z), ref) < ATOL
    assert list(norm.state_dict()) == ["weight"]


def test_decode_step_by_step_equals_chunked_prefill():
    """Conv + SSM over a prompt, then token by token with the update kernels == one long scan."""
    torch.manual_seed(3)
    batch, seqlen, prompt, nheads, headdim, ngroups, dstate, width = 2, 23, 9, 4, 3, 2, 5, 4
    conv_dim = nheads * headdim + 2 * ngroups * dstate
    xBC = torch.randn(batch, conv_dim, seqlen)
    dt, A = torch.randn(batch, seqlen, nheads), -torch.rand(nheads) - 0.5
    dt_bias, D = torch.randn(nheads) * 0.3, torch.randn(nheads)
    w, b = torch.randn(conv_dim, width) * 0.5, torch.randn(conv_dim) * 0.5

    def split(u):  # (b, l, conv_dim) -> x (b,l,h,p), B, C (b,l,g,n)
        x, B, C = u.split([nheads * headdim, ngroups * dstate, ngroups * dstate], dim=-1)
        return (x.unflatten(-1, (nheads, headdim)), B.unflatten(-1, (ngroups, dstate)),
                C.unflatten(-1, (ngroups, dstate)))

    def scan(u, dt_, **kw):
        x, B, C = split(u)
        return mt.mamba_chunk_scan_combined(x, dt_, A, B, C, 8, D=D, dt_bias=dt_bias,
                                            dt_softplus=True, **kw)

    y_full = scan(mt.causal_conv1d_fn(xBC, w, b, activation="silu").transpose(1, 2), dt)

    conv_state = F.pad(xBC[..., :prompt], (width - prompt, 0)) if prompt < width else \
        xBC[..., prompt - width:prompt].clone()
    y_prompt, ssm_state = scan(
        mt.causal_conv1d_fn(xBC[..., :prompt], w, b, activation="silu").transpose(1, 2),
        dt[:, :prompt], return_final_states=True,
    )
    A_full = A[:, None, None].expand(-1, headdim, dstate)
    ys = [y_prompt]
    for t in range(prompt, seqlen):
        u = mt.causal_conv1d_update(xBC[..., t], conv_state, w, b, "silu", None)
        x, B, C = split(u[:, None])
        y = mt.selective_state_update(
            ssm_state, x, dt[:, t:t + 1, :, None].expand(-1, -1, -1, headdim), A_full, B, C,
            D[:, None].expand(-1, headdim), dt_bias=dt_bias[:, None].expand(-1, headdim),
            dt_softplus=True,
        )
        ys.append(y)
    diff = max_diff(torch.cat(ys, 1), y_full)
    print(f"decode vs chunked scan max abs diff: {diff:.2e}")
    assert diff < ATOL


# Megatron's own Triton kernels, run by the Triton interpreter on CPU in a subprocess (the
# interpreter must be chosen before Triton compiles anything), on inputs with padding rows,
# per-token states, initial states and two packed sequences.
TRITON_CROSS_CHECK = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
import rlp_megatron
from rlp_megatron.backends import mamba_torch as mt
from triton.runtime import autotuner
autotuner.Autotuner._bench = lambda self, *a, config, **k: [0.0, 0.0, 0.0]  # no CUDA events
from megatron.core.ssm.ops import causal_conv1d_triton, mamba_ssm, ssd_combined

torch.manual_seed(0)
diffs = {}
b, s, h, p, g, n, W, d = 3, 4, 4, 8, 2, 16, 4, 24
idx = torch.tensor([3, -1, 0], dtype=torch.int32)
x, z = torch.randn(b, s, h, p), torch.randn(b, s, h, p)
B, C = torch.randn(b, s, g, n), torch.randn(b, s, g, n)
args = (x, torch.randn(b, s, h)[..., None].expand(-1, -1, -1, p),
        (-torch.rand(h) - 0.5)[:, None, None].expand(-1, p, n), B, C,
        torch.randn(h)[:, None].expand(-1, p))
state0, dtb = torch.randn(5, h, p, n), torch.randn(h)[:, None].expand(-1, p)
res = []
for fn in (mamba_ssm.selective_state_update, mt.selective_state_update):
    st, inter = state0.clone(), torch.zeros(5, s, h, p, n)
    y = fn(st, *args, z=z, dt_bias=dtb, dt_softplus=True, state_batch_indices=idx,
           intermediate_ssm_states=inter)
    res.append(torch.cat([y.flatten(), st.flatten(), inter.flatten()]))
diffs["selective_state_update"] = (res[0] - res[1]).abs().max().item()

xs, w, bias, cs0 = torch.randn(b, s, d), torch.randn(d, W), torch.randn(d), torch.randn(5, d, W)
res = []
for fn in (causal_conv1d_triton.causal_conv1d_update, mt.causal_conv1d_update):
    cs, inter = cs0.clone(), torch.zeros(5, s, d, W)
    y = fn(xs, cs, w, bias, "silu", idx, inter)
    res.append(torch.cat([y.flatten(), cs.flatten(), inter.flatten()]))
diffs["causal_conv1d_update"] = (res[0] - res[1]).abs().max().item()

T, L = 34, 8  # sequences of 13 and 21 tokens
x, z, dt = torch.randn(T, h, p), torch.randn(T, h, p), torch.randn(T, h) * 0.5
A, D, dtb = -torch.rand(h) - 0.5, torch.randn(h), torch.randn(h) * 0.5
B, C, init = torch.randn(T, g, n), torch.randn(T, g, n), torch.randn(2, h, p, n)
out = torch.zeros_like(x)
states = ssd_combined.mamba_chunk_scan_combined_varlen(
    x, dt, A, B, C, L, torch.tensor([0, 8, 13, 21, 29, 34], dtype=torch.int32),
    torch.tensor([1, 4]), torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32), out, D=D, z=z,
    dt_bias=dtb, initial_states=init, dt_softplus=True, state_dtype=torch.float32)
worst = 0.0
for i, (lo, hi) in enumerate([(0, 13), (13, 34)]):
    y, st = mt.mamba_chunk_scan_combined(
        x[None, lo:hi], dt[None, lo:hi], A, B[None, lo:hi], C[None, lo:hi], L, D=D,
        z=z[None, lo:hi], dt_bias=dtb, dt_softplus=True, initial_states=init[i:i + 1],
        return_final_states=True)
    worst = max(worst, (y[0] - out[lo:hi]).abs().max().item(),
                (st[0] - states[i]).abs().max().item())
diffs["mamba_chunk_scan_combined"] = worst
print(diffs)
"""


def test_torch_kernels_match_megatron_triton_kernels():
    import ast
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", TRITON_CROSS_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    print(f"vs Megatron Triton (interpreted): {diffs}")
    assert max(diffs.values()) < 1e-5, diffs


# ---------------------------------------------------------------------------------------------
# Megatron integration


def test_install_routes_mixer_and_is_idempotent():
    from megatron.core.ssm import mamba_mixer

    assert mt.install() is True and mt.install() is True
    assert mamba_mixer.mamba_chunk_scan_combined is mt.mamba_chunk_scan_combined
    assert mamba_mixer.causal_conv1d_fn is mt.causal_conv1d_fn
    assert mamba_mixer.selective_state_update is mt.selective_state_update
    assert mamba_mixer.causal_conv1d_update is mt.causal_conv1d_update
    assert issubclass(mamba_mixer.ExtendedRMSNorm, mt.RMSNormGated)
    assert "sharded_state_dict" in vars(mamba_mixer.ExtendedRMSNorm)
    assert mamba_mixer.HAVE_MAMBA_SSM


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_hybrid_model_trains_on_cpu(model_parallel, normalization):
    model = tiny_hybrid(normalization)
    assert isinstance(model.decoder.final_norm, getattr(torch.nn, normalization))
    assert all(not layer.mixer.use_mem_eff_path for layer in model.decoder.layers
               if hasattr(layer, "mixer"))
    tokens = torch.randint(0, 97, (2, 20))
    positions = torch.arange(20).expand(2, -1)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    mixer = model.decoder.layers[0].mixer
    for p in (mixer.A_log, mixer.dt_bias, mixer.D, mixer.conv1d_weight, mixer.norm.weight,
              mixer.in_proj.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_hybrid_local_spec_refuses_layer_types_it_lacks(model_parallel):
    with pytest.raises(NotImplementedError, match="MLP"):
        tiny_hybrid(pattern="ME")


def test_hybrid_checkpoint_keys_match_te_spec(model_parallel):
    keys = {v.key for v in tiny_hybrid().sharded_state_dict().values()}
    for expected in [
        "decoder.layers.0.mixer.in_proj.layer_norm_weight",
        "decoder.layers.0.mixer.norm.weight",
        "decoder.layers.0.mixer.conv1d.weight",
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.2.mlp.linear_fc1.layer_norm_weight",
        "decoder.final_norm.weight",
    ]:
        assert expected in keys, expected
    local_names = (".norm.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight")
    assert not any(k.endswith(local_names) and ".mixer.norm." not in k for k in keys)


def test_hybrid_torch_dist_checkpoint_roundtrip(model_parallel, tmp_path):
    from megatron.core import dist_checkpointing

    torch.manual_seed(5)
    saved = tiny_hybrid()
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(torch.randn_like(p))
    dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path))
    loaded = tiny_hybrid()
    loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(), str(tmp_path)))
    for (name, a), b in zip(saved.state_dict().items(), loaded.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_hybrid_decode_matches_teacher_forcing(model_parallel):
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.utils import InferenceMode

    model = tiny_hybrid().eval()
    batch, seqlen, prompt = 2, 20, 11
    tokens = torch.randint(0, 97, (batch, seqlen))
    positions = torch.arange(seqlen).expand(batch, -1)
    with torch.no_grad():
        full = model(tokens, positions, None).log_softmax(-1)  # (b, s, v)

        ctx = StaticInferenceContext(max_batch_size=batch, max_sequence_length=seqlen)
        steps = []
        with InferenceMode.active():
            logits = model(tokens[:, :prompt], positions[:, :prompt], None,
                           inference_context=ctx, runtime_gather_output=True)
            steps.append(logits[:, -1])
            ctx.sequence_len_offset += prompt
            for t in range(prompt, seqlen):
                logits = model(tokens[:, t:t + 1], positions[:, t:t + 1], None,
                               inference_context=ctx, runtime_gather_output=True)
                steps.append(logits[:, -1])
                ctx.sequence_len_offset += 1
    conv_state, ssm_state = ctx.key_value_memory_dict[1]  # layer 1 is Mamba: its cache was used
    assert conv_state.abs().sum() > 0 and ssm_state.abs().sum() > 0
    decoded = torch.stack(steps, 1).log_softmax(-1)
    diff = max_diff(decoded, full[:, prompt - 1:])
    print(f"decode vs teacher forcing max abs log-prob diff: {diff:.2e}")
    assert diff <= 1e-4
