"""What one RLP step costs on CPU, and where the time goes: phases, FLOP/s against NTP, decode
cost per token against position, executed vs useful positions, step time against G and L, first
iteration against steady state — all measured in one run ("An RLP step that costs only its work",
item 7).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rlp_step.py            # ~10 minutes, 2 idle cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rlp_step.py --quick    # ~2-3 minutes, GPT only

Every number comes from real training runs of ``rlp_megatron.train`` (Megatron's own
``pretrain()``), each a fresh process, one after another: rank 0 of 1 (the environment torchrun
sets, without the launcher), gloo, CPU, one thread, fp32, mock data (``MockGPTDataset``,
NullTokenizer, vocabulary 4096), seed 1234 (every run of a model starts from the same weights).
Models: the tests' TINY_GPT at hidden 128 (2 layers, 4 heads, SwiGLU, RMSNorm, RoPE, untied
output layer) and, in the full run (not ``--quick``, not ``--no-hybrid``), the tests'
TINY_HYBRID at hidden 128 (``M-*-M-M-``, 8 layers, ffn 256, 4 Mamba heads × 32, GQA 4/2) for
tables 1, 2, 4 and 6. Each run goes through a thin wrapper (this file, ``--worker``) that calls
``rlp_megatron.train.main`` unchanged and, after each ``train_step``, records the FLOPs Megatron
counts for the iteration — the hooked ``num_floating_point_operations(args, global batch)``:
``train._rlp_flops`` for RLP (the FLOPs the step ran), Megatron's formula for NTP — and the wall
time of ``train_step``. Megatron's console line (``--log-interval 1 --log-throughput``) gives
"elapsed time per iteration (ms)" (its interval timer: the iteration plus its logging); its
TFLOP/s has one decimal (0.0 on CPU), hence the FLOP count from the hook. RLP metrics come from
``--rlp-metrics-file`` (one JSON line per iteration), rollouts from ``--rlp-dump-rollouts``.
"Steady" is the median over iterations 3..N.

1. **Phase split** (RLP run A: G=4, 4 contexts per step of 32..64 tokens, ``--rlp-min-context 32
   --rlp-context-length 64``, thought length L=64, 16 rows, micro-batch 4, ``--seq-length``
   64 + L + 2 = 130, the least the rows need: mock documents are ~2000 tokens long, so a context
   is shorter than 64 only when x_t falls in the window's first 64 tokens, about a third of the
   groups): steady ``rlp/time_rollout_s``, ``rlp/time_teacher_s`` (row layout, EMA-teacher
   forward, advantages), ``rlp/time_update_s`` (Megatron's ``train_step``: forward, backward,
   optimizer), what is left of the recorded ``train_step`` ("other": EMA update, FLOP count,
   metrics), each with its share of ``train_step``; thought length and closed fraction.
2. **Achieved FLOP/s, RLP vs NTP** on the same model and flags (NTP twin of run A: same
   ``--seq-length`` 130, global batch 16, micro-batch 4): FLOPs of iteration i ÷ Megatron's
   elapsed time of iteration i, median over 3..N, and its ratio to NTP.
3. **Decode cost per (row·token)** against thought length L ∈ {64, 128, 256, 512, 1024} (quick:
   64, 256) — GPT, 1 context of exactly 16 tokens, G=4 (4 rows), ``--seq-length`` L + 32.
   Thoughts close only at a sampled ``</think>``, p ≈ 1/4096 per token at this near-uniform
   initialisation: ~2 % of thoughts close within 64 tokens, ~22 % within 1024, so
   ``rlp/thought_len`` ≈ L up to a few hundred (shown, with the closed fraction); a row leaves
   the batch once its thought is scored. decode steps = the rollout's one-token forwards (from
   the dump); row·tokens = ``fed_tokens`` − prefill (every row fed at every step it was in the
   batch); ms / step = ``rlp/time_rollout_s`` ÷ steps, and its ratio to the shortest L (the
   cost of a position for the whole batch: rows that leave early do not make it cheaper on CPU,
   where a step is mostly fixed cost); ms / row·token = ``rlp/time_rollout_s`` ÷
   row·tokens, median over iterations 2..N, and its ratio to the shortest L; the marginal column
   is the cost of the row·tokens added since the previous L, ΔT ÷ Δrow·tokens, i.e. decoding at
   positions L/2..L; ms / generated token = ``rlp/time_rollout_s`` ÷ the thought tokens
   actually sampled.
4. **Executed / useful positions** (run A's dumps, iterations 1..N summed; positions run through
   the model). Rollout: executed = ``fed_tokens`` (the shortest prompt prefilled once per
   context, the rest of each prompt once per context, then one token per row per decode step
   while the row is in the batch), useful = Σ over contexts of the prompt (once) + Σ over rows of
   thought (+1 for a forced ``</think>``); the excess is rows already scored that wait for the
   batch's next compaction. Update: executed = Σ over micro-batches of rows × the micro-batch's
   width (``update_widths``: rows sorted by width, each micro-batch cut to its longest row),
   useful = Σ row lengths (prompt + thought + forced ``</think>``; x_t is only a label).
   Teacher: executed = Σ over micro-batches of contexts × width (``teacher_widths``: the row is
   context + x_t, fed without x_t), useful = Σ context lengths (context = prompt minus
   ``<think>``: no prompt file).
5. **Step time against G and against L** (GPT, 2 contexts of exactly 32 tokens, micro-batch 2):
   G ∈ {2, 4, 8} at L = 32 and L ∈ {16, 32, 64} at G = 4; steady step time (Megatron's elapsed)
   and phases, a least-squares line through the points and its R².
6. **First iteration / steady state**: Megatron's elapsed time of iterations 1 and 2 against the
   steady median, for the NTP twin and RLP run A, and each process's wall time (start-up
   included).

The machine is shared and noisy; the runs are sequential and every number is a median.
``--keep DIR`` keeps the runs' files; ``--keep DIR --reuse`` prints the tables again from them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# Worker: rlp_megatron.train.main with a recorder of per-iteration FLOPs and train_step time.


def worker(record_path: str, argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    from rlp_megatron import train
    from megatron.training import get_args
    from megatron.training import training as mt_training
    from megatron.core.num_microbatches_calculator import get_current_global_batch_size
    import torch

    install = train.install_hooks

    def install_and_record(args):
        run = install(args)
        hooked_step = mt_training.train_step

        def recorded_step(*a, **kw):
            t = time.perf_counter()
            out = hooked_step(*a, **kw)
            dt = time.perf_counter() - t
            flops = mt_training.num_floating_point_operations(get_args(),
                                                              get_current_global_batch_size())
            if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
                with open(record_path, "a") as f:
                    f.write(json.dumps({"iteration": kw["iteration"] + 1, "flops": float(flops),
                                        "train_step_s": dt}) + "\n")
            return out

        mt_training.train_step = recorded_step
        return run

    train.install_hooks = install_and_record
    train.main(argv)


# ------------------------------------------------------------------------------------------------
# Runs

DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "4096",
        "--make-vocab-size-divisible-by", "64", "--seed", "1234"]
# tests/harness.py's TINY_GPT and TINY_HYBRID at hidden 128 (the hybrid's Mamba heads 4 × 32).
GPT = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4",
       "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
       "--normalization", "RMSNorm", "--swiglu", *DATA]
HYBRID = ["--hybrid-layer-pattern", "M-*-M-M-", "--num-layers", "8", "--hidden-size", "128",
          "--ffn-hidden-size", "256", "--num-attention-heads", "4", "--group-query-attention",
          "--num-query-groups", "2", "--mamba-num-heads", "4", "--mamba-head-dim", "32",
          "--mamba-state-dim", "16", "--mamba-num-groups", "2", "--position-embedding-type", "none",
          "--untie-embeddings-and-output-weights", "--normalization", "RMSNorm", "--squared-relu",
          *DATA]
TRAIN = ["--lr", "1e-4", "--min-lr", "1e-4", "--lr-decay-style", "constant", "--log-interval",
         "1", "--log-throughput", "--eval-iters", "0", "--eval-interval", "100000"]
REUSE = False  # --reuse: read the runs already in --keep's folder instead of running them
ITER_LINE = re.compile(
    r" iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def launch(root: Path, name: str, *, iters: int, seq: int, gbs: int, mbs: int,
           rlp: list[str] | None = None, dump: bool = False, model: list[str] = GPT) -> dict:
    from harness import CPU_FLAGS, free_port

    out = root / name
    record = out / "record.jsonl"
    if not (REUSE and (out / "stdout.txt").exists()):
        out.mkdir(parents=True)
        flags = [*model, *CPU_FLAGS, *TRAIN, "--seq-length", str(seq),
                 "--max-position-embeddings", str(seq), "--micro-batch-size", str(mbs),
                 "--global-batch-size", str(gbs), "--train-iters", str(iters)]
        if rlp is not None:
            flags += ["--objective", "rlp", *rlp, "--rlp-metrics-file", str(out / "metrics.jsonl")]
            if dump:
                flags += ["--rlp-dump-rollouts", str(out / "rollouts")]
        # One process: the environment torchrun gives rank 0 of 1 (without the launcher's own
        # torch import, a few seconds per run).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(record), *flags]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=1800)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"run {name} failed (rc={proc.returncode}): {' '.join(cmd)}\n"
                     f"{(proc.stdout + proc.stderr)[-6000:]}")
        (out / "stdout.txt").write_text(proc.stdout)
        (out / "wall_s").write_text(str(wall))
    stdout, wall = (out / "stdout.txt").read_text(), float((out / "wall_s").read_text())
    elapsed = {int(i): float(ms) / 1000 for i, ms in ITER_LINE.findall(stdout)}
    recs = {r["iteration"]: r for r in map(json.loads, record.read_text().splitlines())}
    metrics = {}
    if rlp is not None:
        metrics = {m["iteration"]: m for m in
                   map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    its = []
    for i in sorted(recs):  # = 1..iters (with --reuse: whatever that run had)
        it = {"iteration": i, "elapsed_s": elapsed[i], **recs[i], **metrics.get(i, {})}
        if dump:
            import torch

            it["dump"] = torch.load(out / "rollouts" / f"iter{i:07d}_dp0.pt", weights_only=False)
        its.append(it)
    return {"name": name, "iters": its, "wall_s": wall}


def steady(run: dict, key: str, first: int = 3) -> float:
    return median([it[key] for it in run["iters"] if it["iteration"] >= first])


def rlp_flags(G: int, L: int, min_ctx: int, ctx: int) -> list[str]:
    return ["--rlp-group-size", str(G), "--rlp-thought-length", str(L),
            "--rlp-min-context", str(min_ctx), "--rlp-context-length", str(ctx)]


def linear_fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    icpt = my - slope * mx
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, icpt, (1 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


# ------------------------------------------------------------------------------------------------
# Tables


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def token_counts(dump: dict) -> dict:
    """Executed and useful positions of one step's rollout, teacher and update (see 4.); the
    rollout's excess is rows scored but still in the cache, waiting for compaction."""
    prompts = {g: p for g, p in zip(dump["groups"], dump["prompts"])}
    rows = list(zip(dump["prompts"], dump["thoughts"], dump["closed"]))
    n, c = len(rows), len(prompts)
    row_len = [len(p) + len(t) + (not cl) for p, t, cl in rows]
    contexts = [len(p) - 1 for p in prompts.values()]
    l_min = min(len(p) for p in prompts.values())
    useful = sum(len(p) for p in prompts.values()) + sum(len(t) + (not cl) for _, t, cl in rows)
    return {
        "rollout_exec": dump["fed_tokens"], "rollout_useful": useful,
        "rollout_idle": dump["fed_tokens"] - useful,
        "update_exec": sum(k * w for k, w in dump["update_widths"]),
        "update_useful": sum(row_len),
        "teacher_exec": sum(k * w for k, w in dump["teacher_widths"]),
        "teacher_useful": sum(contexts),
        "decode_steps": dump["decode_steps"], "row_tokens": dump["fed_tokens"] - c * l_min,
        "rows": n, "contexts": c, "context_lengths": contexts,
    }


MODES = {
    "full": dict(iters_main=10, main_L=64, iters_decode=4, decode_L=(64, 128, 256, 512, 1024),
                 iters_sweep=5, G_points=(2, 4, 8), L_points=(16, 32, 64)),
    "quick": dict(iters_main=5, main_L=64, iters_decode=2, decode_L=(64, 256),
                  iters_sweep=4, G_points=(2, 4, 8), L_points=(16, 32, 64)),
    # A check of this script itself (seconds of work per run; the numbers mean little).
    "smoke": dict(iters_main=3, main_L=16, iters_decode=2, decode_L=(16, 32),
                  iters_sweep=3, G_points=(2, 4), L_points=(8, 16)),
}
MAIN_CONTEXT = 64  # run A's --rlp-context-length (--rlp-min-context 32)
SWEEP_G, SWEEP_L, SWEEP_CONTEXTS, SWEEP_CONTEXT = 4, 32, 2, 32  # item 5's fixed values


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="~2-3 minutes: GPT only, fewer iterations and decode lengths")
    ap.add_argument("--no-hybrid", action="store_true",
                    help="full run without the tiny hybrid (Mamba) model (2 runs fewer)")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--keep", type=str, default=None, help="keep the runs' files in this folder")
    ap.add_argument("--reuse", action="store_true",
                    help="with --keep: read runs already in that folder instead of rerunning them")
    args = ap.parse_args(argv)
    global REUSE
    REUSE = args.reuse
    os.environ["OMP_NUM_THREADS"] = "1"
    sys.path.insert(0, str(REPO / "tests"))
    t_start = time.perf_counter()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    c = MODES[mode]
    n_main, main_L, n_dec, n_sw = c["iters_main"], c["main_L"], c["iters_decode"], c["iters_sweep"]
    G_points, L_points = c["G_points"], c["L_points"]
    hybrid = mode == "full" and not args.no_hybrid
    models = {"GPT": GPT, **({"hybrid": HYBRID} if hybrid else {})}

    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(args.keep) if args.keep else Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    runs, ntp, rlp = [], {}, {}
    try:
        # Run A (RLP) and its NTP twin per model: items 1, 2, 4, 6. --seq-length is the least
        # the rows need: mock documents are ~2000 tokens long, so a context is shorter than 64
        # only when x_t lies in the window's first 64 tokens (about a third of the groups).
        main_flags = dict(iters=n_main, seq=MAIN_CONTEXT + main_L + 2, gbs=16, mbs=4)
        for m, flags in models.items():
            ntp[m] = launch(root, f"{m}_ntp", **main_flags, model=flags)
            rlp[m] = launch(root, f"{m}_rlp", **main_flags, model=flags, dump=True,
                            rlp=rlp_flags(4, main_L, 32, MAIN_CONTEXT))
            runs += [ntp[m], rlp[m]]
        # Item 3: decode sweep (GPT; 1 context of 16 tokens, G = 4).
        decode = {}
        for L in c["decode_L"]:
            decode[L] = launch(root, f"decode_L{L}", iters=n_dec, seq=L + 32, gbs=4, mbs=4,
                               rlp=rlp_flags(4, L, 16, 16), dump=True)
            runs.append(decode[L])
        # Item 5: G and L sweeps (GPT).
        sweep = {}
        for G, L in sorted({(G, SWEEP_L) for G in G_points} | {(SWEEP_G, L) for L in L_points}):
            sweep[G, L] = launch(root, f"sweep_G{G}_L{L}", iters=n_sw, seq=SWEEP_CONTEXT + L + 16,
                                 gbs=SWEEP_CONTEXTS * G, mbs=2,
                                 rlp=rlp_flags(G, L, SWEEP_CONTEXT, SWEEP_CONTEXT))
            runs.append(sweep[G, L])
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(f"\nfp32, CPU, 1 process, OMP_NUM_THREADS=1, mock data (vocabulary 4096); {mode} run. "
          f"GPT: 2 layers, hidden 128, 4 heads, SwiGLU, RoPE"
          + (", hybrid: M-*-M-M- (8 layers), hidden 128, Mamba 4 heads × 32" if hybrid else "")
          + ".")

    # 1. Phase split
    print(f"\n## 1. Phase split of an RLP step (run A: G=4, 4 contexts of 32..64 tokens, thought "
          f"length {main_L}, 16 rows, micro-batch 4; median of iterations 3..{n_main}; seconds "
          f"and share of train_step)\n")
    rows = []
    for m, run in rlp.items():
        phases = {k: steady(run, f"rlp/time_{k}_s") for k in ("rollout", "teacher", "update")}
        step_s = steady(run, "train_step_s")
        phases["other"] = median([it["train_step_s"] - sum(it[f"rlp/time_{k}_s"] for k in phases)
                                  for it in run["iters"] if it["iteration"] >= 3])
        rows.append([m, f"{steady(run, 'rlp/thought_len'):.1f}",
                     f"{steady(run, 'rlp/closed_frac'):.2f}"]
                    + [f"{v:.3f} ({v / step_s:.0%})" for v in phases.values()]
                    + [f"{step_s:.3f}", f"{steady(run, 'elapsed_s'):.3f}"])
    print(table(["model", "thought_len", "closed", "rollout", "teacher", "update",
                 "other", "train_step", "Megatron elapsed"], rows))
    print("\nteacher = rows layout, EMA-teacher forward, advantages; update = Megatron's "
          "train_step (forward, backward, optimizer); other = EMA update, FLOP count, metrics.")

    # 2. FLOP/s
    print(f"\n## 2. Achieved FLOP/s, RLP vs NTP (same model and flags: seq-length "
          f"{MAIN_CONTEXT + main_L + 2}, global batch 16, micro-batch 4; FLOPs Megatron counts "
          f"for the iteration ÷ its elapsed time, median of iterations 3..{n_main})\n")
    rows = []
    for m in models:
        fps = {}
        for run, label in ((ntp[m], "NTP"), (rlp[m], "RLP")):
            fps[label] = median([it["flops"] / it["elapsed_s"] for it in run["iters"]
                                 if it["iteration"] >= 3])
            rows.append([m, label, f"{steady(run, 'flops') / 1e9:.2f}",
                         f"{steady(run, 'elapsed_s'):.3f}", f"{fps[label] / 1e9:.2f}",
                         f"{fps[label] / fps['NTP']:.3f}"])
    print(table(["model", "objective", "GFLOP / iteration", "s / iteration", "GFLOP/s",
                 "ratio to NTP"], rows))

    # 3. Decode
    L0 = c["decode_L"][0]
    print(f"\n## 3. Decode cost per (row·token) against thought length L (GPT; 1 context of 16 "
          f"tokens, G=4: 4 rows; median of iterations 2..{n_dec})\n")
    rows, base, base_step, prev = [], None, None, None
    for L, run in decode.items():
        its = [it for it in run["iters"] if it["iteration"] >= 2]
        for it in its:
            counts = token_counts(it["dump"])
            it["decode_steps"], it["row_tokens"] = counts["decode_steps"], counts["row_tokens"]
            it["generated"] = sum(len(t) for t in it["dump"]["thoughts"])
        t_roll, steps, row_tokens = (median([it[k] for it in its]) for k in (
            "rlp/time_rollout_s", "decode_steps", "row_tokens"))
        per = median([it["rlp/time_rollout_s"] / it["row_tokens"] for it in its]) * 1000
        per_gen = median([it["rlp/time_rollout_s"] / it["generated"] for it in its]) * 1000
        base = base or per
        base_step = base_step or t_roll / steps
        marginal = ""
        if prev is not None:
            marginal = f"{(t_roll - prev[0]) / (row_tokens - prev[1]) * 1000:.3f}"
        prev = (t_roll, row_tokens)
        rows.append([L, f"{steady(run, 'rlp/thought_len', first=1):.1f}",
                     f"{steady(run, 'rlp/closed_frac', first=1):.2f}", f"{steps:.0f}",
                     f"{t_roll:.3f}", f"{t_roll / steps * 1000:.2f}",
                     f"{t_roll / steps / base_step:.2f}", f"{per:.3f}",
                     f"{per / base:.2f}", marginal, f"{per_gen:.3f}"])
    print(table(["L", "thought_len", "closed", "decode steps", "rollout s", "ms / step",
                 f"ms / step: ratio to L={L0}", "ms / row·token", f"ratio to L={L0}",
                 "marginal ms / row·token (previous L..L)", "ms / generated token"], rows))
    print("\nthought_len and closed: median over all iterations; row·tokens = tokens fed after "
          "the prefill (a row whose thought closed early leaves the batch: fewer rows share the "
          "later steps' fixed cost, which ms / row·token includes and ms / step does not).")

    # 4. Executed / useful
    print(f"\n## 4. Executed / useful positions (run A: G=4, L={main_L}, contexts of 32..64 "
          f"tokens; iterations 1..{n_main} summed)\n")
    rows = []
    for m, run in rlp.items():
        totals = {}
        for it in run["iters"]:
            for k, v in token_counts(it["dump"]).items():
                totals[k] = totals.get(k, [] if isinstance(v, list) else 0) + v
        ctx = totals["context_lengths"]
        rows.append([m, f"{len(ctx)}: {min(ctx)}..{max(ctx)}, mean {sum(ctx) / len(ctx):.1f}, "
                        f"{sum(x < MAIN_CONTEXT for x in ctx)} < {MAIN_CONTEXT}", totals["rows"]]
                    + [f"{totals[f'{ph}_exec']} / {totals[f'{ph}_useful']} = "
                       f"{totals[f'{ph}_exec'] / totals[f'{ph}_useful']:.3f}"
                       for ph in ("rollout", "update", "teacher")])
        rows[-1].insert(4, f"{totals['rollout_idle']}")
    print(table(["model", "contexts (lengths)", "rows", "rollout executed / useful",
                 "rollout excess: scored rows awaiting compaction", "update", "teacher"], rows))

    # 5. G and L
    print(f"\n## 5. Step time against G and L (GPT; {SWEEP_CONTEXTS} contexts of {SWEEP_CONTEXT} "
          f"tokens, micro-batch 2; median of iterations 3..{n_sw}; seconds)\n")
    rows = []
    for (G, L), run in sorted(sweep.items()):
        rows.append([G, L, SWEEP_CONTEXTS * G, f"{steady(run, 'rlp/thought_len'):.1f}",
                     f"{steady(run, 'elapsed_s'):.3f}"]
                    + [f"{steady(run, f'rlp/time_{k}_s'):.3f}"
                       for k in ("rollout", "teacher", "update")])
    print(table(["G", "L", "rows", "thought_len", "step", "rollout", "teacher", "update"], rows))
    print()
    rows = []
    for var, points in ((f"G (L={SWEEP_L})", [(G, sweep[G, SWEEP_L]) for G in G_points]),
                        (f"L (G={SWEEP_G})", [(L, sweep[SWEEP_G, L]) for L in L_points])):
        xs = [x for x, _ in points]
        for key, label in (("elapsed_s", "step"), ("rlp/time_rollout_s", "rollout"),
                           ("rlp/time_teacher_s", "teacher"), ("rlp/time_update_s", "update")):
            ys = [steady(r, key) for _, r in points]
            slope, icpt, r2 = linear_fit(xs, ys)
            rows.append([var, label, f"{icpt:.3f}", f"{slope * 1000:.2f}", f"{r2:.4f}"])
    print(table(["varied", "time", "intercept s", "slope ms / unit", "R²"], rows))

    # 6. First iteration
    print("\n## 6. First iteration / steady state (Megatron's elapsed time per iteration)\n")
    rows = []
    for m in models:
        for run, label in ((ntp[m], "NTP"), (rlp[m], "RLP run A")):
            e = {it["iteration"]: it["elapsed_s"] for it in run["iters"]}
            st = steady(run, "elapsed_s")
            per_step = ""
            if run is rlp[m]:  # the rollout's work varies with the step's contexts: per step
                ms = {it["iteration"]: it["rlp/time_rollout_s"] * 1000
                      / token_counts(it["dump"])["decode_steps"] for it in run["iters"]}
                per_step = (f"{ms[1]:.1f} / {median([v for i, v in ms.items() if i >= 3]):.1f}")
            rows.append([m, label, f"{e[1]:.3f}", f"{e[2]:.3f}", f"{st:.3f}", f"{e[1] / st:.2f}",
                         f"{e[2] / st:.2f}", per_step, f"{run['wall_s']:.1f}"])
    print(table(["model", "run", "iteration 1 s", "iteration 2 s", f"steady s (3..{n_main})",
                 "first / steady", "second / steady",
                 "rollout ms / decode step: iteration 1 / steady", "process wall s"], rows))
    print("\nAn RLP iteration's work depends on its contexts (mixed lengths add decode steps: "
          "see 4.), so its time per decode step compares iteration 1 with the steady state too.")

    total = "" if REUSE else f"; total {time.perf_counter() - t_start:.0f} s"
    print(f"\n{len(runs)} runs, wall time per process (start-up included): "
          + ", ".join(f"{r['name']} {r['wall_s']:.0f} s" for r in runs)
          + f"; sum {sum(r['wall_s'] for r in runs):.0f} s{total}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
    else:
        main()
