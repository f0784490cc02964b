"""GPU check kit: RLP in bf16 on a ~300M GPT and a ~200M hybrid, with the checks a first GPU run needs.

    bash benchmarks/gpu_check.sh            # on a GPU machine (≤ 8 min on one H100/H200)
    python benchmarks/gpu_check.py --tiny   # the same checks on CPU, tiny models at TP=2 (CI)

Each model runs once through ``rlp_megatron.train`` (Megatron's own ``pretrain()``), bf16, the
distributed optimizer with overlapped grad reduce and param all-gather, ``--rlp-ntp-every 2`` so
that RLP and NTP iterations alternate in one job, and a checkpoint at the end. Checked, from the
job's own output and files:

* every RLP iteration is on-policy: ``rlp/ratio`` within 1e-4 of 1 and ``rlp/clip_frac`` = 0
  (the scoring and update forwards are the same computation on the same rows);
* ``rlp/logprob_mismatch`` (decode-time vs. training-forward log-probs of the same thought tokens)
  has a mean ≤ 0.02 nats: bf16 keeps 8 mantissa bits, so hidden states differ between the KV-cache
  decode and the full forward by a few relative 2^-9, which moves a log-prob of an O(1)-logit
  fresh model by ~1e-3..1e-2 nats; anything larger is a real decode/training divergence (a wrong
  cache, position or state), which is what the check is for;
* the EMA teacher's sidecar (``iter_*/rlp_ema`` with its completion marker) is written.

It prints decode tokens/s, the RLP and NTP iteration times (medians after the first two
iterations), the RLP phase split and RLP vs NTP achieved TFLOP/s per GPU (Megatron's
``--log-throughput``: the figures of ``benchmarks/rlp_step.py``) and the peak memory Megatron reports next to the estimate of
``examples/nemotron_nano_12b_v2/memory_estimate.py`` for the same geometry. Then
``benchmarks/logprob_memory.py --device cuda`` prints the peak memory and time of the four log-prob
paths (full-vocab gather, Megatron's vocab-parallel cross-entropy, ``vocab_parallel_logprobs``,
``fused_linear_logprobs``; impl torch and triton) at T=8192, V=131072, H=4096 in bf16, and checks
that they agree (the Triton kernels with the PyTorch ones); ``--tiny`` runs it on CPU at toy
size. Transformer Engine is used when it imports (``--transformer-impl transformer_engine``), else
the local layers; Mamba kernels are mamba-ssm's when installed, else Megatron's Triton / our
PyTorch ones.
Exit status 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MISMATCH_BOUND = 0.02
RATIO_TOL = 1e-4

SAFE = ["--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
        "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
        "--hidden-dropout", "0", "--attention-dropout", "0"]

# name: (model flags, memory-estimate geometry)
MODELS = {
    "full": {
        "gpt-300M": (["--num-layers", "20", "--hidden-size", "1024", "--ffn-hidden-size", "4096",
                      "--num-attention-heads", "16", "--position-embedding-type", "rope",
                      "--normalization", "RMSNorm", "--squared-relu",
                      "--untie-embeddings-and-output-weights"],
                     dict(pattern="*-" * 20, hidden=1024, ffn=4096, heads=16, kv_groups=16,
                          kv_channels=64)),
        "hybrid-200M": (["--hybrid-layer-pattern", "M-M-M*-M-M-M*-M-", "--num-layers", "16",
                         "--hidden-size", "1024", "--ffn-hidden-size", "4096",
                         "--num-attention-heads", "16", "--group-query-attention",
                         "--num-query-groups", "4", "--mamba-num-heads", "32",
                         "--mamba-head-dim", "64", "--mamba-state-dim", "128",
                         "--mamba-num-groups", "8", "--position-embedding-type", "none",
                         "--normalization", "RMSNorm", "--squared-relu",
                         "--untie-embeddings-and-output-weights"],
                        dict(pattern="M-M-M*-M-M-M*-M-", hidden=1024, ffn=4096, heads=16,
                             kv_groups=4, kv_channels=64, mamba_heads=32, mamba_head_dim=64,
                             mamba_state=128, mamba_groups=8)),
    },
    "tiny": {
        "gpt-tiny": (["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256",
                      "--num-attention-heads", "4", "--position-embedding-type", "rope",
                      "--normalization", "RMSNorm", "--squared-relu",
                      "--untie-embeddings-and-output-weights"],
                     dict(pattern="*-" * 2, hidden=64, ffn=256, heads=4, kv_groups=4,
                          kv_channels=16)),
        "hybrid-tiny": (["--hybrid-layer-pattern", "M-*-M-M-", "--num-layers", "8",
                         "--hidden-size", "64", "--ffn-hidden-size", "128",
                         "--num-attention-heads", "4", "--group-query-attention",
                         "--num-query-groups", "2", "--mamba-num-heads", "4",
                         "--mamba-head-dim", "16", "--mamba-state-dim", "16",
                         "--mamba-num-groups", "2", "--position-embedding-type", "none",
                         "--normalization", "RMSNorm", "--squared-relu",
                         "--untie-embeddings-and-output-weights"],
                        dict(pattern="M-*-M-M-", hidden=64, ffn=128, heads=4, kv_groups=2,
                             kv_channels=16, mamba_heads=4, mamba_head_dim=16, mamba_state=16,
                             mamba_groups=2)),
    },
}

# (seq, vocab, G, thought, context, gbs rows, mbs, iterations, nproc, tp)
JOBS = {
    "full": dict(seq=1024, vocab=32768, G=8, thought=256, context=512, gbs=32, mbs=4, iters=6,
                 nproc=1, tp=1),
    "tiny": dict(seq=64, vocab=128, G=4, thought=8, context=24, gbs=8, mbs=2, iters=3,
                 nproc=2, tp=2),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def job_flags(model_flags: list[str], job: dict, out: Path, tiny: bool) -> list[str]:
    flags = [*model_flags, *SAFE,
             "--seq-length", str(job["seq"]), "--max-position-embeddings", str(job["seq"]),
             "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(job["vocab"]),
             "--make-vocab-size-divisible-by", "64", "--seed", "1234",
             "--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
             "--overlap-param-gather",
             "--tensor-model-parallel-size", str(job["tp"]),
             "--micro-batch-size", str(job["mbs"]), "--global-batch-size", str(job["gbs"]),
             "--lr", "1e-6", "--min-lr", "1e-6", "--lr-decay-style", "constant",
             "--train-iters", str(job["iters"]), "--log-interval", "1", "--eval-iters", "0",
             "--eval-interval", "100000", "--log-throughput", "--save", str(out / "ckpt"),
             "--save-interval", str(job["iters"]),
             "--objective", "rlp", "--rlp-ntp-every", "2", "--rlp-group-size", str(job["G"]),
             "--rlp-thought-length", str(job["thought"]),
             "--rlp-context-length", str(job["context"]), "--rlp-min-context", "4",
             "--rlp-metrics-file", str(out / "metrics.jsonl")]
    if tiny:
        flags += ["--transformer-impl", "local", "--distributed-backend", "gloo",
                  "--use-cpu-initialization"]
    else:
        flags += ["--transformer-impl", "transformer_engine" if _have_te() else "local"]
    return flags


def run_model(name: str, model_flags: list[str], job: dict, root: Path, tiny: bool,
              timeout: int) -> dict:
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(job["nproc"]),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "rlp_megatron.train", *job_flags(model_flags, job, out, tiny)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONWARNINGS": "ignore"}
    if tiny:
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    result = {"name": name, "rc": proc.returncode, "wall_s": wall, "log": out / "log.txt"}
    if proc.returncode != 0:
        result["error"] = (proc.stdout + proc.stderr)[-3000:]
        return result
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    times = {int(m.group(1)): float(m.group(2)) for m in re.finditer(
        r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)", proc.stdout)}
    tflops = {int(m.group(1)): float(m.group(2)) for m in re.finditer(
        r"iteration\s+(\d+)/\s*\d+ \|.*?throughput per GPU \(TFLOP/s/GPU\): ([\d.]+)",
        proc.stdout)}
    peak = [float(x) for x in re.findall(r"max allocated: ([\d.]+)", proc.stdout)]
    result.update(metrics=metrics, times=times, tflops=tflops,
                  peak_mb=max(peak) if peak else None,
                  sidecars=sorted(str(p.parent.relative_to(out)) for p in
                                  (out / "ckpt").glob("iter_*/rlp_ema/rlp_ema_complete.json")))
    return result


# benchmarks/logprob_memory.py arguments: (full: one GPU, TP=1; tiny: CPU, one process, toy size)
LOGPROB_BENCH = {
    "full": ["--device", "cuda", "--check-tol", "1e-3"],
    "tiny": ["--single", "--tokens", "64", "--vocab", "512", "--hidden", "16",
             "--check-tol", "1e-4"],
}


def run_logprob_benchmark(tiny: bool, timeout: int) -> list[str]:
    """Print the log-prob memory/time table; the failed checks (log-probs of a path off those of
    the full-vocab path, or Triton's off PyTorch's), empty if all passed."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "logprob_memory.py"),
           *LOGPROB_BENCH["tiny" if tiny else "full"]]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONWARNINGS": "ignore"}
    if tiny:
        env["OMP_NUM_THREADS"] = "1"
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"timed out after {timeout} s"]
    print(proc.stdout, flush=True)
    if proc.returncode != 0:
        return [f"rc={proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"]
    return []


def check(result: dict) -> list[str]:
    """The failed checks of one model's run (empty: all passed)."""
    if result["rc"] != 0:
        return [f"run failed (rc={result['rc']}): see {result['log']}"]
    failures = []
    rlp = [m for m in result["metrics"] if m["objective"] == "rlp"]
    ntp = [m for m in result["metrics"] if m["objective"] == "ntp"]
    if not rlp or not ntp:
        failures.append(f"expected RLP and NTP iterations, got {len(rlp)} RLP / {len(ntp)} NTP")
    for m in rlp:
        it = m["iteration"]
        if abs(m["rlp/ratio"] - 1.0) > RATIO_TOL:
            failures.append(f"iteration {it}: rlp/ratio {m['rlp/ratio']:.6g} is not 1 (on-policy)")
        if m["rlp/clip_frac"] != 0.0:
            failures.append(f"iteration {it}: rlp/clip_frac {m['rlp/clip_frac']:.3g} != 0")
        if not m["rlp/logprob_mismatch"] <= MISMATCH_BOUND:
            failures.append(f"iteration {it}: rlp/logprob_mismatch {m['rlp/logprob_mismatch']:.3g}"
                            f" > {MISMATCH_BOUND}")
        for key in ("rlp/s_pred", "rlp/s_ema", "rlp/loss"):
            if m[key] != m[key]:
                failures.append(f"iteration {it}: {key} is NaN")
    if not result["sidecars"]:
        failures.append("no complete EMA sidecar (iter_*/rlp_ema/rlp_ema_complete.json) written")
    return failures


def memory_estimate_gib(geometry: dict, job: dict) -> float:
    sys.path.insert(0, str(REPO / "examples" / "nemotron_nano_12b_v2"))
    import memory_estimate as me

    model = me.Model(vocab=job["vocab"], **geometry)
    j = me.Job(nodes=1, gpus_per_node=job["nproc"], group_size=job["G"],
               thought_length=job["thought"], context_length=job["context"],
               seq_length=job["seq"], global_batch_size=job["gbs"])
    e = me.estimate(model, j, me.Layout(job["tp"], 1, job["mbs"], 0, "none"))
    return e["total"] / me.GiB


def _median_after_warmup(times: dict, iterations: list[int]) -> float | None:
    xs = [times[i] for i in iterations if i in times and i > 2] or \
         [times[i] for i in iterations if i in times]
    return statistics.median(xs) if xs else None


def report(result: dict, geometry: dict, job: dict) -> str:
    if result["rc"] != 0:
        return f"{result['name']}: FAILED to run\n{result.get('error', '')}"
    rlp = [m for m in result["metrics"] if m["objective"] == "rlp"]
    ntp = [m for m in result["metrics"] if m["objective"] == "ntp"]
    t_rlp = _median_after_warmup(result["times"], [m["iteration"] for m in rlp])
    t_ntp = _median_after_warmup(result["times"], [m["iteration"] for m in ntp])
    tok_s = statistics.median(m["rlp/gen_tokens_per_s"] for m in rlp) if rlp else float("nan")
    mism = max((m["rlp/logprob_mismatch"] for m in rlp), default=float("nan"))
    mism_max = max((m["rlp/logprob_mismatch_max"] for m in rlp), default=float("nan"))
    peak = f"{result['peak_mb'] / 1024:.2f} GiB" if result["peak_mb"] else "n/a (CPU)"
    ratio = f"{t_rlp / t_ntp:.1f}x" if t_rlp and t_ntp else "n/a"
    # benchmarks/rlp_step.py's figures on this GPU: the phase split and RLP vs NTP achieved FLOP/s
    # (Megatron's --log-throughput, which counts the FLOPs RLP actually runs).
    phases = "/".join(f"{statistics.median(m[f'rlp/time_{k}_s'] for m in rlp) * 1000:.0f}"
                      if rlp else "n/a" for k in ("rollout", "teacher", "update"))
    f_rlp = _median_after_warmup(result["tflops"], [m["iteration"] for m in rlp])
    f_ntp = _median_after_warmup(result["tflops"], [m["iteration"] for m in ntp])
    f_ratio = f"{f_rlp / f_ntp:.2f}" if f_rlp and f_ntp else "n/a"
    return (f"{result['name']}: decode {tok_s:,.0f} tok/s | RLP iteration {t_rlp:.0f} ms vs NTP "
            f"{t_ntp:.0f} ms ({ratio}) | rollout/teacher/update {phases} ms | TFLOP/s/GPU RLP "
            f"{f_rlp} vs NTP {f_ntp} (ratio {f_ratio}) | peak memory {peak} vs estimate "
            f"{memory_estimate_gib(geometry, job):.2f} GiB | logprob_mismatch mean {mism:.2e} "
            f"(max token {mism_max:.2e}) | sidecars {result['sidecars']} | wall "
            f"{result['wall_s']:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU at TP=2 (CI mode)")
    ap.add_argument("--only", default=None,
                    help="run one model by name, or 'logprobs' for the log-prob benchmark")
    ap.add_argument("--out", default=None, help="keep outputs here (default: a temp dir)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per model run")
    args = ap.parse_args(argv)
    size = "tiny" if args.tiny else "full"
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --tiny for the CPU mode", file=sys.stderr)
            return 2
        print(f"gpu_check: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"transformer-engine: {'yes' if _have_te() else 'no (local layers)'}", flush=True)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rlp_gpu_check_"))
    job = JOBS[size]
    failed = False
    for name, (flags, geometry) in MODELS[size].items():
        if args.only and name != args.only:
            continue
        result = run_model(name, flags, job, root, args.tiny, args.timeout)
        print(report(result, geometry, job), flush=True)
        failures = check(result)
        for f in failures:
            print(f"  FAIL {name}: {f}", flush=True)
        print(f"  {name}: {'FAILED' if failures else 'all checks passed'}", flush=True)
        failed |= bool(failures)
    if not args.only or args.only == "logprobs":
        failures = run_logprob_benchmark(args.tiny, args.timeout)
        for f in failures:
            print(f"  FAIL logprobs: {f}", flush=True)
        print(f"  logprobs: {'FAILED' if failures else 'all checks passed'}", flush=True)
        failed |= bool(failures)
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
