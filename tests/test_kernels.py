"""rlp_megatron.kernels against a naive full-vocabulary float64 reference: log softmax(z/T)[target]
over the real vocabulary (padded ids masked), its entropy, and the gradients of the logits, of the
hidden states and of the output weight; at TP=1 in this process and at TP=2 in two processes over
gloo (the vocabulary sharded as Megatron shards it, targets on every shard). The Triton kernels run
under ``TRITON_INTERPRET=1`` in those processes (the variable must be set before the kernels'
module is imported) and must equal the PyTorch path.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import free_port
from rlp_megatron.kernels import fused_linear_logprobs, vocab_parallel_logprobs
from rlp_megatron.kernels.torch_logprobs import fused_linear_logprobs_torch

torch.set_num_threads(1)
U = 2.0 ** -24  # fp32 unit roundoff
ATOL = 1e-5
V, H = 50, 16  # 2 shards of 25 at TP=2
SHAPES = [(7,), (3, 5), (2, 3, 5)]  # 7, 15, 30 tokens: chunk_size 4 divides none of them


def reference(z, targets, vocab_size, temperature):
    """float64 (logp, entropy) of the full logits ``z`` [..., V]; ids ≥ vocab_size are padding."""
    z = z.double() / temperature
    z = z.masked_fill(torch.arange(z.shape[-1]) >= vocab_size, float("-inf"))
    lp = torch.log_softmax(z, -1)
    p = lp.exp()
    return lp.gather(-1, targets[..., None])[..., 0], -(p * lp.masked_fill(p == 0, 0)).sum(-1)


def make_targets(shape, vocab_size, gen, shard=V // 2):
    """Random real ids, with the first ones at both shards' edges (every shard owns targets)."""
    t = torch.randint(0, vocab_size, shape, generator=gen)
    edges = [i for i in (0, shard - 1, shard, vocab_size - 1) if i < vocab_size]
    t.view(-1)[:len(edges)] = torch.tensor(edges)
    return t


def assert_close(a, b, atol=ATOL, rtol=0.0, what=""):
    err = (a.double() - b.double()).abs()
    bound = atol + rtol * b.double().abs()
    assert bool((err <= bound).all()), f"{what}: max err {err.max():.3g}, max excess " \
                                       f"{(err - bound).max():.3g}"


# ---------------------------------------------------------------------------------------------
# TP = 1, PyTorch path, in this process.


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("vocab_size,temperature", [(V, 1.0), (45, 0.7)])
def test_vocab_parallel_logprobs_equal_reference(shape, vocab_size, temperature):
    gen = torch.Generator().manual_seed(len(shape))
    z = (torch.randn(*shape, V, generator=gen) * 3).requires_grad_()
    t = make_targets(shape, vocab_size, gen)
    g = torch.randn(shape, generator=gen)
    logp, ent = vocab_parallel_logprobs(z, t, vocab_size=vocab_size, temperature=temperature,
                                        return_entropy=True, impl="torch")
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == shape
    assert not ent.requires_grad
    (logp * g).sum().backward()
    z64 = z.detach().double().requires_grad_()
    ref, ref_ent = reference(z64, t, vocab_size, temperature)
    (ref * g.double()).sum().backward()
    assert_close(logp, ref, what="logp")
    assert_close(ent, ref_ent, what="entropy")
    assert_close(z.grad, z64.grad, what="dlogits")
    assert bool((z.grad[..., vocab_size:] == 0).all())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("vocab_size,temperature", [(V, 1.0), (45, 0.7)])
@pytest.mark.parametrize("vocab_chunk", [None, 16])  # 16: online LSE over tiles of the shard
def test_fused_linear_logprobs_equal_reference(shape, vocab_size, temperature, vocab_chunk):
    gen = torch.Generator().manual_seed(10 + len(shape))
    h = torch.randn(*shape, H, generator=gen).requires_grad_()
    w = (torch.randn(V, H, generator=gen) * 0.5).requires_grad_()
    t = make_targets(shape, vocab_size, gen)
    g = torch.randn(shape, generator=gen)
    kw = dict(chunk_size=4, vocab_size=vocab_size, temperature=temperature, return_entropy=True)
    if vocab_chunk is None:
        logp, ent = fused_linear_logprobs(h, w, t, impl="torch", **kw)
    else:
        logp, ent = fused_linear_logprobs_torch(h, w, t, vocab_chunk=vocab_chunk, **kw)
    (logp * g).sum().backward()
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    ref, ref_ent = reference(h64 @ w64.T, t, vocab_size, temperature)
    (ref * g.double()).sum().backward()
    assert_close(logp, ref, what="logp")
    assert_close(ent, ref_ent, what="entropy")
    assert_close(h.grad, h64.grad, what="dhidden")
    assert_close(w.grad, w64.grad, what="dweight")


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_entropy_has_no_cancellation_at_large_logits(offset):
    """Entropy = log S − Σ p·(z − m)/S, accumulated relative to the running max (and the vocab
    tiles merged with it): computing lse − Σ p·z subtracts two ~1000-nat numbers (an error of
    2e-4 at offset 1000 before the fix)."""
    gen = torch.Generator().manual_seed(5)
    # Multiples of 1/8 and T = 1: the logits are exact in fp32, so any error is the kernel's.
    z = torch.round(torch.randn(16, 1000, generator=gen) * 80) / 8 + offset
    t = torch.randint(0, 1000, (16,), generator=gen)
    _, ref_ent = reference(z.double(), t, 1000, 1.0)
    _, ent = vocab_parallel_logprobs(z, t, return_entropy=True, impl="torch")
    assert_close(ent, ref_ent, what="entropy")
    eye = torch.eye(1000)  # the fused path: hidden = z, weight = I, 3 vocab tiles of 400
    _, ent = fused_linear_logprobs_torch(z, eye, t, return_entropy=True, vocab_chunk=400)
    assert_close(ent, ref_ent, what="fused entropy")


def test_bf16_inputs_have_fp32_accuracy():
    """bf16 logits / hidden states / weight: the kernels upcast to fp32, so against the float64
    reference on the SAME bf16 values the only error is fp32 arithmetic. First-order bound per
    token, u = 2^-24: z/T is one rounding (u·|z|); each exp(z − m) has relative error ≲ u·(|z − m|
    + 2); a sum of V terms ≤ V·u relative; m + log S and z_t − lse two more roundings. So
    |Δlogp| ≤ (4·max|z/T| + 2V)·u, the entropy likewise. The fused path's logits add fp32
    accumulation of H exact bf16×bf16 products: |Δz| ≤ H·u·Σ_k|h_k w_k| / T, counted twice (z_t and
    lse). Gradients come back in bf16: relative 2^-9 from the final rounding (we allow 2^-8) on
    top of fp32 accumulation (≤ 1e-5 of the largest entry here). For scale: rounding the logits
    themselves to bf16, as Megatron's bf16 output layer does, costs ~max|z|·2^-9 ≈ 0.05 nats."""
    gen = torch.Generator().manual_seed(3)
    shape, vocab_size, temperature = (3, 5), 45, 0.7
    t = make_targets(shape, vocab_size, gen)
    g = torch.randn(shape, generator=gen)

    z = (torch.randn(*shape, V, generator=gen) * 8).bfloat16().requires_grad_()
    logp, ent = vocab_parallel_logprobs(z, t, vocab_size=vocab_size, temperature=temperature,
                                        return_entropy=True, impl="torch")
    (logp * g).sum().backward()
    assert z.grad.dtype == torch.bfloat16
    z64 = z.detach().double().requires_grad_()
    ref, ref_ent = reference(z64, t, vocab_size, temperature)
    (ref * g.double()).sum().backward()
    bound = (4 * z64.detach().abs().max().item() / temperature + 2 * V) * U
    assert_close(logp, ref, atol=bound, what="bf16 logp")
    assert_close(ent, ref_ent, atol=bound, what="bf16 entropy")
    assert_close(z.grad, z64.grad, atol=1e-5 * z64.grad.abs().max().item(), rtol=2 ** -8, what="bf16 dz")

    h = (torch.randn(*shape, H, generator=gen) * 2).bfloat16().requires_grad_()
    w = (torch.randn(V, H, generator=gen) * 2).bfloat16().requires_grad_()
    logp, ent = fused_linear_logprobs(h, w, t, chunk_size=4, vocab_size=vocab_size,
                                      temperature=temperature, return_entropy=True, impl="torch")
    (logp * g).sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    z64 = h64 @ w64.T
    ref, ref_ent = reference(z64, t, vocab_size, temperature)
    (ref * g.double()).sum().backward()
    dot_err = H * U * (h64.detach().abs() @ w64.detach().abs().T).max().item() / temperature
    bound = (4 * z64.detach().abs().max().item() / temperature + 2 * V) * U + 2 * dot_err
    assert_close(logp, ref, atol=bound, what="bf16 fused logp")
    assert_close(ent, ref_ent, atol=bound, what="bf16 fused entropy")
    for got, want, name in ((h.grad, h64.grad, "dhidden"), (w.grad, w64.grad, "dweight")):
        assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=2 ** -8, what=f"bf16 {name}")
    # What the bf16 output layer would give: the bound above is far below its error.
    rounded, _ = reference((h64 @ w64.T).detach().bfloat16(), t, vocab_size, temperature)
    assert (rounded - ref).abs().max().item() > 100 * bound


# ---------------------------------------------------------------------------------------------
# TP = 2 over gloo (PyTorch and Triton-interpreter paths), and Triton vs PyTorch at TP = 1.


def _tp2_worker(rank, port, done_dir):
    # TRITON_INTERPRET=1 came from the parent's environment: Triton reads it when a kernel is
    # decorated, including its own tl.* helpers at `import triton` (which Megatron's import does).
    from rlp_megatron.kernels import triton_logprobs

    assert type(triton_logprobs._logprob_stats_kernel).__name__ == "InterpretedFunction"

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        group = dist.new_group([0, 1])
        shard = V // 2
        cols = slice(rank * shard, (rank + 1) * shard)
        start = rank * shard
        # (shape, real vocabulary, T): 24 < 25 makes rank 1's shard all padding.
        for shape, vocab_size, temperature in [((3, 5), 45, 0.7), ((7,), V, 1.0),
                                               ((2, 3, 5), 24, 1.3)]:
            gen = torch.Generator().manual_seed(vocab_size)  # same data on both ranks
            full = torch.randn(*shape, V, generator=gen) * 3
            h_full = torch.randn(*shape, H, generator=gen)
            w_full = torch.randn(V, H, generator=gen) * 0.5
            t = make_targets(shape, vocab_size, gen)
            g = torch.randn(shape, generator=gen)
            z64 = full.double().requires_grad_()
            ref, ref_ent = reference(z64, t, vocab_size, temperature)
            (ref * g.double()).sum().backward()
            h64, w64 = (x.double().requires_grad_() for x in (h_full, w_full))
            fref, fref_ent = reference(h64 @ w64.T, t, vocab_size, temperature)
            (fref * g.double()).sum().backward()
            kw = dict(vocab_start=start, vocab_size=vocab_size, temperature=temperature,
                      return_entropy=True)
            case = f"rank {rank} shape {shape} vocab {vocab_size}"

            grads = {}
            for impl in ("torch", "triton"):
                z = full[..., cols].clone().requires_grad_()
                logp, ent = vocab_parallel_logprobs(z, t, group, impl=impl, **kw)
                (logp * g).sum().backward()
                assert_close(logp, ref, what=f"{case} {impl} logp")
                assert_close(ent, ref_ent, what=f"{case} {impl} entropy")
                assert_close(z.grad, z64.grad[..., cols], what=f"{case} {impl} dlogits")
                grads[impl] = (logp, ent, z.grad)
            for a, b, name in zip(grads["torch"], grads["triton"], ("logp", "entropy", "dz")):
                assert_close(a, b, what=f"{case} triton vs torch {name}")

            # Fused: hidden replicated over TP, weight sharded; d hidden must be the FULL
            # gradient (every shard's share), not this shard's.
            h = h_full.clone().requires_grad_()
            w = w_full[cols].clone().requires_grad_()
            logp, ent = fused_linear_logprobs(h, w, t, group, chunk_size=4, impl="torch", **kw)
            (logp * g).sum().backward()
            assert_close(logp, fref, what=f"{case} fused logp")
            assert_close(ent, fref_ent, what=f"{case} fused entropy")
            assert_close(h.grad, h64.grad, what=f"{case} fused dhidden")
            assert_close(w.grad, w64.grad[cols], what=f"{case} fused dweight")

        if rank == 0:  # Triton at TP = 1 (no group), several splits per row, fp32 and bf16
            gen = torch.Generator().manual_seed(5)
            for dtype in (torch.float32, torch.bfloat16):
                z0 = (torch.randn(2, 3, V, generator=gen) * 4).to(dtype)
                t = make_targets((2, 3), 45, gen)
                g = torch.randn(2, 3, generator=gen)
                outs = []
                for fn in (lambda z: vocab_parallel_logprobs(
                               z, t, vocab_size=45, temperature=0.7, return_entropy=True,
                               impl="torch"),
                           lambda z: triton_logprobs.vocab_parallel_logprobs_triton(
                               z, t, vocab_size=45, temperature=0.7, return_entropy=True,
                               block_v=8, num_splits=3)):
                    z = z0.clone().requires_grad_()
                    logp, ent = fn(z)
                    (logp * g).sum().backward()
                    outs.append((logp, ent, z.grad))
                assert outs[1][2].dtype == dtype
                for a, b, name in zip(*outs, ("logp", "entropy", "dz")):
                    # dz in bf16: both round the same fp32 value to bf16, up to 1 ulp apart.
                    rtol = 2 ** -7 if (name == "dz" and dtype == torch.bfloat16) else 0.0
                    assert_close(a, b, rtol=rtol, what=f"TP=1 {dtype} triton vs torch {name}")
        (done_dir / f"rank{rank}.done").write_text("all checks passed")
    finally:
        dist.destroy_process_group()


def test_tp2_equals_full_vocabulary_reference_and_triton_equals_torch(tmp_path):
    """The ms-swift #9947 trap: log-probs right but gradients wrong at TP>1. Here every value
    and gradient of a TP=2 run equals the unsharded float64 reference."""
    # Inherited by the spawned processes only. The kernels need no Megatron: skipping the CPU
    # backend (which imports it) saves each process most of its start-up.
    env = {"TRITON_INTERPRET": "1", "RLP_MEGATRON_CPU_BACKEND": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(_tp2_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    # Each rank got through every comparison (a failed one raises in its process).
    assert sorted(p.name for p in tmp_path.glob("*.done")) == ["rank0.done", "rank1.done"]


def test_triton_kernels_compile_for_hopper():
    """The interpreter does not run Triton's compiler (which, e.g., refuses non-constexpr
    globals); compile the kernels (log-probs and sampling) for sm_90 ahead of time, which needs
    no GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are interpreted")
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rlp_megatron.kernels import triton_logprobs as tk

    ints = dict.fromkeys(("n_cols", "vocab_start", "vocab_size"), "i32")
    stats = {"X": "*bf16", "stride_x": "i32", "TGT": "*i64", **dict.fromkeys(
        ("M_OUT", "S_OUT", "W_OUT", "T_OUT"), "*fp32"), "cols_per_split": "i32",
        "n_splits": "i32", **ints, "temperature": "fp32", "ENTROPY": "constexpr",
        "BLOCK_V": "constexpr"}
    grad = {"X": "*bf16", "stride_x": "i32", "DX": "*bf16", "stride_dx": "i32", "TGT": "*i64",
            "LSE": "*fp32", "G": "*fp32", **ints, "temperature": "fp32", "BLOCK_V": "constexpr"}
    for kernel, sig, constexprs, warps in (
            (tk._logprob_stats_kernel, stats, {"ENTROPY": True, "BLOCK_V": 4096}, 8),
            (tk._logprob_grad_kernel, grad, {"BLOCK_V": 1024}, 4)):
        compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert compiled.asm["cubin"]
    from rlp_megatron.kernels import triton_sampling as ts

    sample = {"X": "*fp32", "stride_x": "i32", "KEYS": "*i64", "TEMP": "*fp64", "BEST": "*fp64",
              "ARG": "*i64", **ints, "BLOCK_V": "constexpr"}
    compiled = triton.compile(ASTSource(ts._gumbel_max_kernel, sample,
                                        constexprs={"BLOCK_V": 2048}),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert compiled.asm["cubin"]


def test_auto_uses_triton_only_for_cuda_tensors_and_the_env_var_forces_torch(monkeypatch):
    from rlp_megatron import kernels

    cuda_like = type("T", (), {"is_cuda": True})()
    cpu_like = type("T", (), {"is_cuda": False})()
    name = "vocab_parallel_logprobs_triton"
    assert kernels._pick("auto", cpu_like, name) is None
    assert kernels._pick("torch", cuda_like, name) is None
    assert kernels._pick("auto", cuda_like, name) is kernels._triton_module().__dict__[name]
    monkeypatch.setenv("RLP_MEGATRON_LOGPROB_IMPL", "torch")
    assert kernels._pick("auto", cuda_like, name) is None
    with pytest.raises(ValueError):
        kernels._pick("fast", cpu_like, name)

