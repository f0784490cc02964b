"""What the CPU backend itself costs, before and after the changes of "An RLP step that costs only
its work" item 6, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_backend_overhead.py [--iters 8] [--pretrain]

1. Per torch call: a loop of small ops timed with no torch-function mode, with the backend's mode
   as it was (``LegacyCudaToCpuMode`` below, a verbatim copy of the old ``__torch_function__``),
   with the mode as it is, and with a pass-through mode (``return func(*args, **kwargs)``), which
   is the floor any Python ``TorchFunctionMode`` pays: torch's C++ mode dispatch. µs per call,
   overhead over no mode, and the ratio to the no-mode time.
2. A tiny Megatron GPT forward+backward in-process (the tests' TINY_GPT geometry: 2 layers, hidden
   64, SwiGLU with Megatron's bias-SwiGLU fusion, RMSNorm, RoPE, seq 64, batch 2; world size 1 over
   gloo), each configuration in a fresh process:
   before = Megatron's ``jit_fuser`` fusions compiled (``RLP_MEGATRON_CPU_COMPILE_FUSIONS=1``,
   as before item 6) and the legacy mode; after = the defaults. First-iteration and median steady
   time, their ratio, torch calls through the mode per iteration, torch.compile frames, and a hash
   of the loss and every gradient of the first iteration (equal hashes: bitwise-equal numerics).
3. With ``--pretrain``: the tests' tiny pretrain (``python -m rlp_megatron.train`` under torchrun,
   one process, TINY_GPT) with and without compiled fusions; Megatron's "elapsed time per
   iteration" for each iteration.

The machine is shared and noisy: every time is the best (or median) of several repeats.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import rlp_megatron  # noqa: E402,F401  (enables the CPU backend when there is no GPU)
from rlp_megatron.backends import cpu  # noqa: E402
from rlp_megatron.backends.cpu import _AUTOGRAD_ENTRY_POINTS, _CUDA_TYPE, _TLS  # noqa: E402

_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:  # as it was (also used by the legacy mode only)
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _map_device(device):  # as it was: no cache, reads torch.device.type (~1 µs) every call
    return _CPU if _is_cuda_device(device) else device


class LegacyCudaToCpuMode(TorchFunctionMode):
    """The backend's mode before item 6 (verbatim, with its ``_map_device``): every check ran for
    every call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _AUTOGRAD_ENTRY_POINTS:
            pending = getattr(_TLS, "remode_engine", False)
            _TLS.remode_engine = True
            try:
                return func(*args, **kwargs)
            finally:
                _TLS.remode_engine = pending
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory or func is torch.Tensor.is_pinned:
            return args[0] if func is torch.Tensor.pin_memory else False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE.get(name, name)
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        if "pin_memory" in kwargs:
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1:
            first = args[1]
            if isinstance(first, (str, torch.device, int)) and not isinstance(first, bool):
                args = (args[0], _map_device(first), *args[2:])
        return func(*args, **kwargs)


def _swap_backend_mode(new_mode) -> None:
    """Replace the backend's active mode (bottom of the stack) by ``new_mode``."""
    assert torch.overrides._get_current_function_mode_stack() == [cpu._MODE]
    torch.overrides._pop_mode()
    cpu._MODE = new_mode
    torch.overrides._push_mode(new_mode)


# ---------------------------------------------------------------------------------------------
# 1. per-op overhead


def per_op(repeats: int) -> dict:
    import torch.nn.functional as F

    if not cpu.cpu_backend_enabled():
        sys.exit("CUDA is available: the CPU backend is off, nothing to measure")

    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x, y, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16, 16)
    cpu_dev = torch.device("cpu")
    ops = {
        "x + y": lambda: x + y,
        "x.shape": lambda: x.shape,
        "x.view(-1)": lambda: x.view(-1),
        "x.float()": lambda: x.float(),
        "torch.matmul(x, w)": lambda: torch.matmul(x, w),
        "F.silu(x)": lambda: F.silu(x),
        "torch.empty(4, device=cpu)": lambda: torch.empty(4, device=cpu_dev),
        "torch.zeros(4, device='cuda')": lambda: torch.zeros(4, device="cuda"),
        "x.to(device)": lambda: x.to(cpu_dev),
    }
    modes = {"none": None, "legacy": LegacyCudaToCpuMode(), "now": cpu.CudaToCpuMode(),
             "pass-through": PassThrough()}
    n = 4000

    def timed(fn, mode):
        if mode is not None:
            torch.overrides._push_mode(mode)
        try:
            for _ in range(200):
                fn()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t) / n * 1e6
        finally:
            if mode is not None:
                torch.overrides._pop_mode()

    print(f"1. per torch call (µs; best of {repeats} interleaved repeats; +overhead over no mode)")
    print(f"   {'op':30s} {'no mode':>8s} {'legacy mode':>19s} {'mode now':>19s} "
          f"{'pass-through':>19s}")
    with torch.overrides._pop_mode_temporarily():  # the backend's own mode off: "none" is bare
        totals = {m: 0.0 for m in modes}
        for name, fn in ops.items():
            runnable = ("legacy", "now") if "'cuda'" in name else tuple(modes)  # needs the remap
            best = {m: float("inf") for m in runnable}
            for _ in range(repeats):
                for m in runnable:
                    best[m] = min(best[m], timed(fn, modes[m]))
            if "none" not in best:
                print(f"   {name:30s} {'-':>8s} {best['legacy']:8.2f}{'':11s} "
                      f"{best['now']:8.2f}{'':11s} {'-':>19s}")
                continue
            base = best["none"]
            for m in modes:
                totals[m] += best[m]
            cols = [f"{best[m]:8.2f} (+{best[m] - base:5.2f}, {best[m] / base:4.1f}x)"
                    for m in ("legacy", "now", "pass-through")]
            print(f"   {name:30s} {base:8.2f} " + " ".join(cols))
        k = len(ops) - 1
        over = {m: (totals[m] - totals["none"]) / k for m in modes}
        print(f"   mean overhead per call: legacy +{over['legacy']:.2f} µs, now "
              f"+{over['now']:.2f} µs, pass-through floor +{over['pass-through']:.2f} µs; "
              f"the mode's own code: legacy {over['legacy'] - over['pass-through']:+.2f}, now "
              f"{over['now'] - over['pass-through']:+.2f} µs over the floor")
    return over


# ---------------------------------------------------------------------------------------------
# 2. tiny Megatron forward + backward (child process)


def fwd_bwd_child(iters: int, legacy: bool) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from harness import free_port

    if legacy:
        _swap_backend_mode(LegacyCudaToCpuMode())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
        gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=True,
        normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False)
    import logging

    logging.disable(logging.WARNING)  # GPTModel's deprecation notice
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=128,
                     max_sequence_length=64, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    tokens = torch.randint(0, 128, (2, 64))
    positions = torch.arange(64).expand(2, 64)
    mask = torch.tril(torch.ones(1, 1, 64, 64)).lt(0.5)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(tokens, positions, mask, labels=tokens).float().mean()
        loss.backward()
        return loss

    times, digest = [], None
    for i in range(iters):
        t = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - t) * 1000)
        if i == 0:
            h = hashlib.sha256(loss.detach().numpy().tobytes())
            for p in model.parameters():
                h.update(p.grad.numpy().tobytes())
            digest = h.hexdigest()[:16]

    calls = [0]
    mode_cls = type(cpu._MODE)
    original = mode_cls.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        calls[0] += 1
        return original(self, func, types, args, kwargs)

    mode_cls.__torch_function__ = counting
    try:
        step()
    finally:
        mode_cls.__torch_function__ = original
    from torch._dynamo.utils import counters

    print(json.dumps({"times_ms": times, "digest": digest,
                      "mode_calls": calls[0], "mode": mode_cls.__name__,
                      "compiled_frames": counters["frames"]["total"]}))


def fwd_bwd(iters: int, compile_fusions: bool, legacy: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "RLP_MEGATRON_CPU_COMPILE_FUSIONS": "1" if compile_fusions else "0"}
    cmd = [sys.executable, __file__, "--child", str(iters)] + (["--legacy"] if legacy else [])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"child failed: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def pretrain(iters: int, compile_fusions: bool) -> list[float]:
    from harness import TINY_GPT, TRAIN_FLAGS, torchrun

    proc = torchrun(1, ["-m", "rlp_megatron.train", *TINY_GPT, *TRAIN_FLAGS,
                        "--train-iters", str(iters)],
                    env={"RLP_MEGATRON_CPU_COMPILE_FUSIONS": "1" if compile_fusions else "0"})
    return [float(v) for v in
            re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", proc.stdout)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=8, help="forward+backward iterations per run")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per op")
    ap.add_argument("--pretrain", action="store_true", help="also time the tiny pretrain()")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fwd_bwd_child(args.child, args.legacy)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    over = per_op(args.repeats)

    print(f"\n2. tiny Megatron GPT forward+backward, {args.iters} iterations, fresh process each")
    configs = {"before (compiled fusions, legacy mode)": (True, True),
               "after  (eager fusions, mode now)": (False, False)}
    results = {}
    for label, (compile_fusions, legacy) in configs.items():
        r = fwd_bwd(args.iters, compile_fusions, legacy)
        first, steady = r["times_ms"][0], statistics.median(r["times_ms"][2:])
        results[label] = (first, steady, r)
        over_now = over["legacy" if legacy else "now"]
        print(f"   {label}: first {first:8.1f} ms, second {r['times_ms'][1]:7.1f} ms, steady "
              f"{steady:6.1f} ms (median of {len(r['times_ms']) - 2}), first/steady "
              f"{first / steady:6.1f}x | {r['mode_calls']} calls through the mode per iteration "
              f"≈ {r['mode_calls'] * over_now / 1000:.1f} ms of it | compiled frames "
              f"{r['compiled_frames']} | loss+grads hash {r['digest']}")
    (b_first, b_steady, b), (a_first, a_steady, a) = results.values()
    print(f"   first iteration {b_first / a_first:.1f}x faster, steady {b_steady / a_steady:.2f}x; "
          f"numerics {'bitwise equal' if a['digest'] == b['digest'] else 'DIFFER'} "
          f"(loss and every gradient of the first iteration)")

    if args.pretrain:
        print("\n3. tiny pretrain (python -m rlp_megatron.train, TINY_GPT, 1 process): Megatron's "
              "elapsed ms per iteration")
        for label, compile_fusions in (("before (compiled fusions)", True),
                                       ("after  (eager fusions)   ", False)):
            ms = pretrain(args.iters, compile_fusions)
            print(f"   {label}: " + " ".join(f"{v:.0f}" for v in ms)
                  + f"  | first {ms[0]:.0f}, first two {ms[0] + ms[1]:.0f}, steady "
                  f"{statistics.median(ms[2:]):.0f}")


if __name__ == "__main__":
    main()
