"""The paired table of examples/demo/study.sh: treatment (RLP) against control (LR 1e-12).

    python examples/demo/paired.py STUDY_DIR      # seed{s}_treatment/, seed{s}_control/

Per seed, from each run's ``metrics.jsonl``:

* training: d_i = info_gain(treatment, i) − info_gain(control, i) for each iteration i. Both runs
  drew the same positions and noise, so d_i is the effect of what the treatment learned up to i,
  and the shared per-position variance cancels: the table shows the standard error of the last
  quarter's mean of d next to that of the treatment's own info gain (unpaired);
  the OLS slope of d per 100 iterations with its standard error;
* held-out: rlp_eval/info_gain of treatment minus control at the last evaluation (the control's
  evaluation is the starting model's), and the thought length and closed fraction there.

Across seeds: the mean and standard error of the per-seed numbers.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def read(path: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, path.read_text().splitlines())}


def se(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """OLS slope of ys on xs and its standard error."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = [y - my - b * (x - mx) for x, y in zip(xs, ys)]
    return b, math.sqrt(sum(r * r for r in resid) / (len(xs) - 2) / sxx)


def seed_row(treat: dict[int, dict], ctrl: dict[int, dict]) -> dict[str, float]:
    its = sorted(i for i in treat if i in ctrl and "rlp/info_gain" in treat[i]
                 and "rlp/info_gain" in ctrl[i])
    d = [treat[i]["rlp/info_gain"] - ctrl[i]["rlp/info_gain"] for i in its]
    q = len(its) // 4
    b, b_se = slope([i - its[0] for i in its], d)
    evals = [i for i in its if "rlp_eval/info_gain" in treat[i] and "rlp_eval/info_gain" in ctrl[i]]
    last = evals[-1]
    return {
        "first_q": statistics.fmean(d[:q]), "last_q": statistics.fmean(d[-q:]),
        "last_q_se_paired": se(d[-q:]),
        "last_q_se_unpaired": se([treat[i]["rlp/info_gain"] for i in its[-q:]]),
        "slope100": 100 * b, "slope100_se": 100 * b_se,
        "eval_start": ctrl[last]["rlp_eval/info_gain"],
        "eval_diff": treat[last]["rlp_eval/info_gain"] - ctrl[last]["rlp_eval/info_gain"],
        "eval_curve": [round(treat[i]["rlp_eval/info_gain"] - ctrl[i]["rlp_eval/info_gain"], 4)
                       for i in evals],
        "len_treat": treat[last]["rlp_eval/thought_len"],
        "len_ctrl": ctrl[last]["rlp_eval/thought_len"],
        "nll_diff": treat[last]["rlp_eval/reasoned_nll"] - ctrl[last]["rlp_eval/reasoned_nll"],
        "iters": len(its),
    }


def main(argv=None) -> None:
    study = Path((argv or sys.argv[1:])[0])
    rows = {}
    for treat in sorted(study.glob("seed*_treatment/metrics.jsonl")):
        seed = treat.parent.name.split("_")[0]
        ctrl = study / f"{seed}_control" / "metrics.jsonl"
        if ctrl.exists():
            rows[seed] = seed_row(read(treat), read(ctrl))
    if not rows:
        raise SystemExit(f"paired: no seed*_treatment / seed*_control pairs in {study}")
    cols = [("first_q", "train Δ 1st ¼"), ("last_q", "train Δ last ¼"),
            ("last_q_se_paired", "SE paired"), ("last_q_se_unpaired", "SE unpaired"),
            ("slope100", "Δ slope/100it"), ("slope100_se", "± SE"),
            ("eval_start", "held-out start"), ("eval_diff", "held-out Δ"),
            ("nll_diff", "reasoned NLL Δ"), ("len_ctrl", "len ctrl"), ("len_treat", "len treat")]
    print("info gain (nats): treatment − control, same positions and noise "
          f"({next(iter(rows.values()))['iters']} RLP iterations per run)")
    print(f"{'seed':<8}" + "".join(f"{name:>16}" for _, name in cols))
    for seed, r in rows.items():
        print(f"{seed:<8}" + "".join(f"{r[k]:>16.4f}" for k, _ in cols))
    if len(rows) > 1:
        for label, f in (("mean", statistics.fmean), ("SE", se)):
            print(f"{label:<8}" + "".join(f"{f([r[k] for r in rows.values()]):>16.4f}"
                                          for k, _ in cols))
    for seed, r in rows.items():
        print(f"{seed}: held-out Δ at each evaluation: {r['eval_curve']}")


if __name__ == "__main__":
    main()
