"""Peak memory and time of four ways to get per-token log-probs from the output layer.

    python benchmarks/logprob_memory.py                 # TP=2 on CPU: 2 processes over gloo
    python benchmarks/logprob_memory.py --device cuda   # TP=1 on one GPU, impl torch and triton

Each variant starts from the last hidden states ``h`` [T, H] and this rank's vocab-parallel output
weight shard ``W`` [V/TP, H], and gives log softmax(h W^T)[target] per token:

  (i)   full-vocab: ``h @ W.T``, Megatron's ``gather_from_tensor_model_parallel_region`` to [T, V],
        fp32 ``log_softmax`` and a gather (Megatron-RL's path);
  (ii)  Megatron's ``tensor_parallel.vocab_parallel_cross_entropy`` on the fp32 shard ``(h @ W.T)
        .float()`` (what ``rlp_megatron.logprobs.token_logprobs`` did before rlp_megatron.kernels);
  (iii) ``rlp_megatron.kernels.vocab_parallel_logprobs(h @ W.T, ...)``;
  (iv)  ``rlp_megatron.kernels.fused_linear_logprobs(h, W, ...)`` (logits never materialised).

"fwd" is a scoring pass under ``torch.no_grad()``; "fwd+bwd" is ``logp.sum().backward()`` into
``h`` and ``W`` (their gradients count). Memory is the peak *above* what the process held after
building its inputs (h, W, targets): on CPU the resident-set high-water mark (VmHWM, reset through
``/proc/self/clear_refs`` right before the variant; pages actually touched, per rank, the larger of
the two ranks), in a fresh pair of processes per (variant, pass) forked after the imports; on CUDA
``torch.cuda.max_memory_allocated`` (tensors only, no allocator cache). Time: wall clock of the
variant (CPU: one timed run after a small warm-up, the slower rank; CUDA: median of 5 after 2
warm-ups). The CPU runs use fp32 inputs (bf16 matmuls on CPU are not what a GPU run measures);
the CUDA run uses bf16 h and W, so (i)–(iii) get bf16 logits from the matmul (Megatron's bf16
output layer) while (iv) takes fp32 products of the bf16 inputs (``torch.mm(...,
out_dtype=torch.float32)``: tensor cores, fp32 sums and result).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("i", "ii", "iii", "iv")
NAMES = {"i": "(i) full-vocab gather + log_softmax", "ii": "(ii) Megatron vocab_parallel_CE, fp32",
         "iii": "(iii) vocab_parallel_logprobs", "iv": "(iv) fused_linear_logprobs"}
TARGETS = {"iii": (0.6, 1.0), "iv": (0.1, 1.3)}  # the (memory, time) ratios vs (i)
GiB = 2 ** 30


# ------------------------------------------------------------------------------------------------
# The four variants (rank-local; ``tp`` holds group, vocab_start, vocab_size, impl).


def run_variant(variant, h, w, tgt, tp):
    import torch

    from megatron.core import tensor_parallel
    from rlp_megatron import kernels

    kw = dict(vocab_start=tp["vocab_start"], vocab_size=tp["vocab_size"], impl=tp["impl"])
    if variant in ("i", "ii", "iii"):
        # Megatron's ColumnParallelLinear: identity forward, all-reduce of d h in backward (so
        # every variant gives h its full gradient; (iv) all-reduces it itself).
        h = tensor_parallel.copy_to_tensor_model_parallel_region(h)
    if variant == "i":
        full = tensor_parallel.gather_from_tensor_model_parallel_region(h @ w.T)
        return torch.log_softmax(full.float(), -1).gather(-1, tgt[:, None])[:, 0]
    if variant == "ii":
        logits = (h @ w.T).float()
        return -tensor_parallel.vocab_parallel_cross_entropy(
            logits.reshape(-1, 1, logits.shape[-1]), tgt.reshape(-1, 1)).reshape(tgt.shape)
    if variant == "iii":
        return kernels.vocab_parallel_logprobs(h @ w.T, tgt, tp["group"], **kw)
    if variant == "iv":
        return kernels.fused_linear_logprobs(h, w, tgt, tp["group"], chunk_size=tp["chunk"], **kw)
    raise ValueError(variant)


def make_inputs(tokens, vocab, hidden, tp_size, rank, device, dtype, seed=0):
    import torch

    v_local = vocab // tp_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen, dtype=torch.float32)
    # Logits of a trained LM's magnitude (std ~3): h·w has variance hidden·σ_h²σ_w².
    w = torch.randn(vocab, hidden, generator=gen) * (3.0 / hidden ** 0.5)
    tgt = torch.randint(0, vocab, (tokens,), generator=gen)
    w = w[rank * v_local:(rank + 1) * v_local].clone()
    h, w = (x.to(device=device, dtype=dtype).requires_grad_() for x in (h, w))
    return h, w, tgt.to(device)


def _malloc_returns_memory():
    """glibc: serve allocations ≥ 1 MiB with mmap (given back on free) instead of its dynamic
    threshold (up to 32 MiB), so that freed pages a variant reuses are not hidden from VmHWM."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rss_hwm_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _proc_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _one_pass(variant, mode, h, w, tgt, tp):
    import torch

    if mode == "fwd":
        with torch.no_grad():
            logp = run_variant(variant, h, w, tgt, tp)
        return logp, None
    h.grad = w.grad = None
    logp = run_variant(variant, h, w, tgt, tp)
    logp.sum().backward()
    return logp.detach(), h.grad


# ------------------------------------------------------------------------------------------------
# CPU, TP=2: one fresh pair of processes per (variant, pass).


def _cpu_worker(rank, world, port, variant, mode, cfg, out_dir):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from megatron.core import parallel_state

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    parallel_state.initialize_model_parallel(world)
    group = parallel_state.get_tensor_model_parallel_group()
    v_local = cfg["vocab"] // world
    tp = dict(group=group, vocab_start=rank * v_local, vocab_size=cfg["vocab"], impl="torch",
              chunk=cfg["chunk"])
    # Warm-up on a small slice (first-call costs: gloo pairs, lazy imports), then the real inputs.
    sh, sw, st = make_inputs(64, cfg["vocab"], cfg["hidden"], world, rank, "cpu", torch.float32, 1)
    _one_pass(variant, mode, sh, sw, st, tp)
    del sh, sw, st
    h, w, tgt = make_inputs(cfg["tokens"], cfg["vocab"], cfg["hidden"], world, rank, "cpu",
                            torch.float32)
    dist.barrier()
    _rss_hwm_reset()
    base = _proc_kib("VmRSS")
    t0 = time.perf_counter()
    logp, dh = _one_pass(variant, mode, h, w, tgt, tp)
    elapsed = time.perf_counter() - t0
    peak = _proc_kib("VmHWM") - base
    dist.barrier()
    result = dict(rank=rank, peak_bytes=peak * 1024, base_bytes=base * 1024, time_s=elapsed,
                  logp=logp[:512].tolist(), dh=None if dh is None else dh[:8].flatten().tolist())
    Path(out_dir, f"{variant}_{mode}_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def naive_peak_estimate(tokens, vocab, tp):
    """Bytes per rank of (i) fwd+bwd in fp32: 3 [T, V] buffers measured at T=2048, V=131072
    (the gathered logits or Megatron's gather buffer, log_softmax's output and its gradient),
    plus half of one as slack."""
    return int(3.5 * tokens * vocab * 4)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_tp(args) -> list[dict]:
    import psutil
    import torch.multiprocessing as mp

    tp = args.tp
    budget = min(args.memory_budget_gib * GiB, 0.8 * psutil.virtual_memory().available)
    tokens = args.tokens
    while tokens > 256 and tp * naive_peak_estimate(tokens, args.vocab, tp) > budget:
        tokens //= 2
    print(f"CPU, TP={tp} (gloo, {tp} processes, 1 thread each), fp32: T={tokens} tokens, "
          f"V={args.vocab}, H={args.hidden}, chunk_size={args.chunk}, temperature 1, no padding")
    if tokens != args.tokens:
        print(f"  T scaled down from {args.tokens}: (i) needs ~"
              f"{tp * naive_peak_estimate(args.tokens, args.vocab, tp) / GiB:.0f} GiB across the "
              f"{tp} ranks at T={args.tokens}, over the {budget / GiB:.0f} GiB budget "
              f"(--memory-budget-gib, and 80% of available memory)")
    cfg = dict(tokens=tokens, vocab=args.vocab, hidden=args.hidden, chunk=args.chunk)
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    os.environ.update(env)
    sys.path.insert(0, str(REPO))
    _malloc_returns_memory()
    import torch

    torch.set_num_threads(1)
    import rlp_megatron  # noqa: F401  (imported once, before the forks)
    from megatron.core import parallel_state, tensor_parallel  # noqa: F401
    from rlp_megatron import kernels  # noqa: F401

    rows = []
    with tempfile.TemporaryDirectory(prefix="logprob_mem_") as out:
        for mode in ("fwd", "fwd+bwd"):
            for variant in args.variants:
                # Fresh processes, forked from this one after the imports (a spawn would spend
                # tens of seconds importing Megatron in each).
                mp.start_processes(_cpu_worker, args=(tp, _free_port(), variant, mode, cfg, out),
                                   nprocs=tp, start_method="fork")
                ranks = [json.loads(Path(out, f"{variant}_{mode}_{r}.json").read_text())
                         for r in range(tp)]
                rows.append(dict(variant=variant, impl="torch", mode=mode,
                                 peak=max(r["peak_bytes"] for r in ranks),
                                 base=max(r["base_bytes"] for r in ranks),
                                 time=max(r["time_s"] for r in ranks),
                                 logp=ranks[0]["logp"], dh=ranks[0]["dh"]))
                print(f"  {NAMES[variant]} {mode}: peak +{rows[-1]['peak'] / GiB:.2f} GiB, "
                      f"{rows[-1]['time']:.2f} s", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# One process, TP=1 (CUDA: the GPU check kit calls this; CPU: its tiny mode).


def single_process(device: str, tokens: int, vocab: int, hidden: int, impls, chunk: int,
                   repeats: int = 5) -> list[dict]:
    import torch
    import torch.distributed as dist

    import rlp_megatron  # noqa: F401
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1)
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    h, w, tgt = make_inputs(tokens, vocab, hidden, 1, 0, device, dtype)
    fused_triton = False
    if "triton" in impls:
        from rlp_megatron.kernels import triton_logprobs

        fused_triton = hasattr(triton_logprobs, "fused_linear_logprobs_triton")
        if not fused_triton:
            print("  (no Triton fused_linear_logprobs: (iv) runs the PyTorch path only)")
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for variant in VARIANTS:
            for impl in (impls if variant in ("iii", "iv") else ["-"]):
                if variant == "iv" and impl == "triton" and not fused_triton:
                    continue
                tp = dict(group=None, vocab_start=0, vocab_size=vocab, chunk=chunk,
                          impl="torch" if impl == "-" else impl)
                times = []
                for i in range((2 + repeats) if cuda else 2):
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    else:
                        _rss_hwm_reset()
                        base = _proc_kib("VmRSS") * 1024
                    t0 = time.perf_counter()
                    logp, dh = _one_pass(variant, mode, h, w, tgt, tp)
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    peak = (torch.cuda.max_memory_allocated() if cuda
                            else _proc_kib("VmHWM") * 1024) - base
                    del logp, dh
                    h.grad = w.grad = None
                logp, dh = _one_pass(variant, mode, h, w, tgt, tp)
                rows.append(dict(variant=variant, impl=impl, mode=mode, peak=peak, base=base,
                                 time=statistics.median(times[2:] if cuda else times[1:]),
                                 logp=logp.float().cpu(),
                                 dh=None if dh is None else dh[:64].float().cpu()))
                h.grad = w.grad = None
    return rows


# ------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    import torch

    ref = {r["mode"]: r for r in rows if r["variant"] == "i"}
    out = ["| variant | impl | pass | peak memory | × (i) | time | × (i) | max abs Δlogp vs (i) "
           "| max abs Δ dh vs (i) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = ref.get(r["mode"])
        lp = torch.as_tensor(r["logp"])
        d_lp = d_dh = "-"
        if base is not None and r is not base:
            d_lp = f"{(lp - torch.as_tensor(base['logp'])).abs().max().item():.1e}"
            if r["dh"] is not None and base["dh"] is not None:
                d_dh = f"{(torch.as_tensor(r['dh']) - torch.as_tensor(base['dh'])).abs().max():.1e}"
        mem_x = f"{r['peak'] / base['peak']:.2f}" if base and base["peak"] > 0 else "-"
        time_x = f"{r['time'] / base['time']:.2f}" if base and base["time"] > 0 else "-"
        out.append(f"| {NAMES[r['variant']]} | {r['impl']} | {r['mode']} | "
                   f"{r['peak'] / GiB:.3f} GiB | {mem_x} | {r['time'] * 1e3:.1f} ms | {time_x} | "
                   f"{d_lp} | {d_dh} |")
    return "\n".join(out)


def verdicts(rows: list[dict]) -> list[str]:
    ref = {r["mode"]: r for r in rows if r["variant"] == "i"}
    lines = []
    for r in rows:
        if r["variant"] in TARGETS and r["mode"] == "fwd+bwd" and ref.get(r["mode"]) \
                and ref[r["mode"]]["peak"] > 0:
            mem, tim = TARGETS[r["variant"]]
            m = r["peak"] / ref[r["mode"]]["peak"]
            t = r["time"] / ref[r["mode"]]["time"]
            ok = m <= mem and t <= tim
            lines.append(f"{NAMES[r['variant']]} [{r['impl']}] fwd+bwd: memory {m:.2f}× "
                         f"(target ≤ {mem}×), time {t:.2f}× (target ≤ {tim}×): "
                         f"{'met' if ok else 'NOT met'}")
    return lines


def agreement_failures(rows: list[dict], tol: float, skip_vs_naive=()) -> list[str]:
    """Rows whose log-probs differ from (i)'s (same pass) or from the torch impl's (same variant
    and pass) by more than ``tol``. ``skip_vs_naive``: variants not compared with (i) (on CUDA (iv)
    multiplies bf16 inputs in fp32, while (i) gets bf16-rounded logits: ~1e-2 apart)."""
    import torch

    def diff(a, b):
        return (torch.as_tensor(a["logp"]) - torch.as_tensor(b["logp"])).abs().max().item()

    ref = {r["mode"]: r for r in rows if r["variant"] == "i"}
    by_impl = {(r["variant"], r["mode"], r["impl"]): r for r in rows}
    bad = []
    for r in rows:
        base = ref.get(r["mode"])
        if base is not None and r is not base and r["variant"] not in skip_vs_naive:
            if not diff(r, base) <= tol:
                bad.append(f"{NAMES[r['variant']]} [{r['impl']}] {r['mode']}: |logp - (i)| "
                           f"{diff(r, base):.2e} > {tol}")
        twin = by_impl.get((r["variant"], r["mode"], "torch"))
        if r["impl"] == "triton" and twin is not None:
            if not diff(r, twin) <= tol:
                bad.append(f"{NAMES[r['variant']]} triton {r['mode']}: |logp - torch| "
                           f"{diff(r, twin):.2e} > {tol}")
            if r["dh"] is not None and twin["dh"] is not None:
                a, b = torch.as_tensor(r["dh"]), torch.as_tensor(twin["dh"])
                d = (a - b).abs().max().item()
                scale = b.abs().max().item()
                if not d <= 1e-2 * scale:  # bf16 gradients: a few bf16 ulps
                    bad.append(f"{NAMES[r['variant']]} triton {r['mode']}: |dh - torch| {d:.2e}"
                               f" > 1e-2 × {scale:.2e}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: TP processes over gloo; cuda: one GPU at TP=1")
    ap.add_argument("--single", action="store_true", help="one process at TP=1 (CPU: tiny check)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--hidden", type=int, default=None, help="default 256 on CPU, 4096 on CUDA")
    ap.add_argument("--chunk", type=int, default=1024, help="fused_linear_logprobs chunk_size")
    ap.add_argument("--impls", default=None, help="comma list (default: torch,triton on CUDA)")
    ap.add_argument("--variants", default="i,ii,iii,iv")
    ap.add_argument("--memory-budget-gib", type=float, default=16.0,
                    help="CPU: scale T down until (i) fits in this across the ranks")
    ap.add_argument("--check-tol", type=float, default=None,
                    help="exit 1 if a variant's log-probs differ from (i)'s by more")
    args = ap.parse_args(argv)
    args.variants = args.variants.split(",")
    if args.hidden is None:
        args.hidden = 4096 if args.device == "cuda" else 256
    if args.device == "cuda" or args.single:
        impls = (args.impls or ("torch,triton" if args.device == "cuda" else "torch")).split(",")
        print(f"{args.device}, TP=1, {'bf16' if args.device == 'cuda' else 'fp32'} h and W: "
              f"T={args.tokens}, V={args.vocab}, H={args.hidden}, chunk_size={args.chunk}, "
              f"impls {impls}", flush=True)
        rows = single_process(args.device, args.tokens, args.vocab, args.hidden, impls, args.chunk)
    else:
        rows = cpu_tp(args)
    print(table(rows))
    if not (args.single and args.device == "cpu"):  # the toy CPU check: ratios mean nothing
        for line in verdicts(rows):
            print(line)
    if args.check_tol is not None:
        bad = agreement_failures(rows, args.check_tol,
                                 skip_vs_naive=("iv",) if args.device == "cuda" else ())
        for line in bad:
            print(f"  FAIL {line}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
