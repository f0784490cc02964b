"""Curves of a run across its objective switches, and the held-out before/after table.

    python -m rlp_megatron.plot RUN_DIR_OR_METRICS_FILE [--out PNG]

Reads the per-iteration records of ``--rlp-metrics-file`` (one JSON line per iteration, both
objectives; a directory means its ``metrics.jsonl``) and writes one PNG (default: next to the
metrics, ``rlp_curves.png``) with: the training reward (``rlp/info_gain``, or RPT's
``rlp/reward``), thought length, closed fraction, the losses (NTP's ``lm loss``, the RLP
surrogate, ``rlp/ntp_loss``), and the in-loop evaluation (``rlp_eval/*``: held-out information
gain, reasoned and no-think NLL); RLP/RPT iterations are shaded, so the switch is visible. A
per-iteration series longer than 2 × ``SMOOTH`` points is drawn faintly under its trailing mean
of ``SMOOTH`` iterations (one iteration's reward is a handful of contexts: noise). Prints
the before/after table of the held-out evaluation: the last evaluation before the first RLP/RPT
iteration against the last one of the RLP/RPT iterations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SMOOTH = 20  # iterations in the trailing mean drawn over a long per-iteration series
EVAL_KEYS = ("info_gain", "reasoned_nll", "nothink_nll", "thought_len", "closed_frac")


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = {}
    for r in records:  # a resumed run may log an iteration twice: the later one counts
        last[r["iteration"]] = r
    return [last[i] for i in sorted(last)]


def before_after(records: list[dict]) -> tuple[dict | None, dict | None]:
    """(the last evaluation before the first RLP/RPT iteration, the last one of the RLP/RPT
    iterations — or of the file, if none fell there) of ``records``."""
    evals = [r for r in records if "rlp_eval/info_gain" in r]
    rl = [r["iteration"] for r in records if r.get("objective") in ("rlp", "rpt")]
    before = [r for r in evals if not rl or r["iteration"] < rl[0]]
    during = [r for r in evals if rl and rl[0] <= r["iteration"] <= rl[-1]]
    after = during or evals
    return (before[-1] if before else None), (after[-1] if after else None)


def table(records: list[dict]) -> str:
    before, after = before_after(records)
    if after is None:
        return "no rlp_eval/* records (run with --rlp-eval-interval N)"
    rows = [f"{'held-out (rlp_eval/*)':<24}{'before RLP':>14}{'after RLP':>14}"]
    head = (f"{'':<24}{'iter ' + str(before['iteration']) if before else '—':>14}"
            f"{'iter ' + str(after['iteration']):>14}")
    rows.append(head)
    for key in EVAL_KEYS:
        b = f"{before[f'rlp_eval/{key}']:.4f}" if before else "—"
        rows.append(f"{key:<24}{b:>14}{after[f'rlp_eval/{key}']:>14.4f}")
    return "\n".join(rows)


def plot(records: list[dict], out) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["iteration"], r[key]) for r in records if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    def trailing_mean(y, n=SMOOTH):
        return [sum(y[max(0, i - n + 1):i + 1]) / len(y[max(0, i - n + 1):i + 1])
                for i in range(len(y))]

    panels = [
        ("training reward", [("rlp/info_gain", "info gain S_pred − S_EMA"),
                             ("rlp/reward", "RPT match rate")]),
        ("thought length", [("rlp/thought_len", "training"), ("rlp_eval/thought_len", "held-out")]),
        ("closed fraction", [("rlp/closed_frac", "training"), ("rlp_eval/closed_frac", "held-out")]),
        ("loss", [("lm loss", "NTP lm loss"), ("rlp/loss", "RLP surrogate"),
                  ("rlp/ntp_loss", "NTP term")]),
        ("held-out information gain", [("rlp_eval/info_gain", "S_pred − S_EMA")]),
        ("held-out NLL of x_t", [("rlp_eval/reasoned_nll", "after a thought"),
                                 ("rlp_eval/nothink_nll", "no thought (θ)")]),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(11, 9), sharex=True)
    rl = [r["iteration"] for r in records if r.get("objective") in ("rlp", "rpt")]
    for ax, (title, keys) in zip(axes.flat, panels):
        for key, label in keys:
            x, y = series(key)
            if len(x) > 2 * SMOOTH:  # per-iteration training values: noisy, drawn faintly
                line, = ax.plot(x, y, alpha=0.3, lw=0.8)
                ax.plot(x, trailing_mean(y), color=line.get_color(),
                        label=f"{label} (mean of {SMOOTH})")
            elif x:
                ax.plot(x, y, marker="o", markersize=3, label=label)
        for it in rl:  # RLP/RPT iterations shaded
            ax.axvspan(it - 0.5, it + 0.5, color="tab:orange", alpha=0.12, lw=0)
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("iteration (shaded: RLP)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory (its metrics.jsonl) or a --rlp-metrics-file")
    p.add_argument("--out", default=None, help="PNG path (default: rlp_curves.png beside it)")
    a = p.parse_args(argv)
    records = read_metrics(a.run)
    run = Path(a.run)
    out = a.out or (run if run.is_dir() else run.parent) / "rlp_curves.png"
    print(table(records))
    print(f"plot: {plot(records, out)}")


if __name__ == "__main__":
    main()
