"""python -m rlp_megatron.plot: the held-out before/after table and the PNG, from a metrics file
of a run that switched NTP → RLP (and was resumed: a repeated iteration counts once)."""

import json
import subprocess
import sys

from harness import REPO
from rlp_megatron import plot


def _records():
    out = []
    for it in range(1, 9):
        rl = 5 <= it <= 7
        r = {"iteration": it, "objective": "rlp" if rl else "ntp"}
        r.update({"rlp/info_gain": 0.1 * it, "rlp/thought_len": 12.0, "rlp/closed_frac": 0.5,
                  "rlp/loss": 0.0} if rl else {"lm loss": 5.0 - 0.1 * it})
        if it % 2 == 0:
            r.update({f"rlp_eval/{k}": it + i / 10 for i, k in enumerate(plot.EVAL_KEYS)})
        out.append(r)
    return out


def test_before_after_table_and_png(tmp_path):
    records = _records()
    lines = [json.dumps(r) for r in records]
    lines.insert(5, json.dumps({**records[5], "rlp/info_gain": -9.0}))  # superseded by a resume
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    read = plot.read_metrics(tmp_path)
    assert [r["iteration"] for r in read] == list(range(1, 9))
    before, after = plot.before_after(read)
    # the last evaluation before RLP (iterations 5–7) and the last one during it
    assert before["iteration"] == 4 and after["iteration"] == 6
    proc = subprocess.run([sys.executable, "-m", "rlp_megatron.plot", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line}
    assert rows["info_gain"] == ["4.0000", "6.0000"] and rows["nothink_nll"] == ["4.2000", "6.2000"]
    png = tmp_path / "rlp_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
