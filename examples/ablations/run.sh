#!/usr/bin/env bash
# One short run of each objective / position-selection variant from the same NTP checkpoint, with
# its logged metrics side by side (tiny hybrid Mamba model, TP=2, CPU, ~5 minutes):
#   NTP pretraining -> checkpoint
#   -> RLP (uniform, the paper) | RLP, entropy positions | RLP, easy-to-hard curriculum
#   -> RLP, K=2 positions per window | RPT (--objective rpt) | RLP + 0.5 x NTP on the other tokens
# Each variant loads the NTP checkpoint and saves into its own directory, so all start from the
# same weights, data position and iteration. The table at the end reads their metrics files.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tools/setup_env.sh
PY=${PYTHON:-.venv/bin/python}
source examples/tiny_hybrid/model_flags.sh   # TINY_HYBRID_FLAGS, TINY_CPU_FLAGS, TINY_DATA_FLAGS
OUT=${OUT:-runs/ablations}
ITERS=${ITERS:-3}   # RLP iterations per variant
rm -rf "$OUT"; mkdir -p "$OUT"
export OMP_NUM_THREADS=1

COMMON=("${TINY_HYBRID_FLAGS[@]}" "${TINY_CPU_FLAGS[@]}" "${TINY_DATA_FLAGS[@]}"
  --tensor-model-parallel-size 2 --micro-batch-size 2 --global-batch-size 16
  --log-interval 1 --eval-iters 0 --eval-interval 100000 --save-interval 1000
  --ckpt-format torch_dist --lr-decay-style constant --log-throughput)
RLP=(--train-iters $((8 + ITERS)) --lr 1e-4 --min-lr 1e-4 --override-opt-param-scheduler
  --rlp-group-size 4 --rlp-thought-length 16 --rlp-context-length 32 --rlp-min-context 8)

train() {  # train <name> <flags...>: one torchrun job into $OUT/<name>
  local name=$1; shift
  echo "=== $name ==="
  "$PY" -m torch.distributed.run --nproc-per-node 2 --master-port "${PORT:-29563}" \
      -m rlp_megatron.train "${COMMON[@]}" --rlp-metrics-file "$OUT/$name/metrics.jsonl" "$@" \
      2>&1 | tee "$OUT/$name.log" | grep -E "iteration +[0-9]+/|Error|error:" \
    | sed -E 's/ \[[0-9-]+ [0-9:.]+\]//' | cut -c1-220
}

train ntp --objective ntp --train-iters 8 --lr 1e-3 --min-lr 1e-3 --save "$OUT/ntp/ckpt"
variant() { local name=$1; shift; train "$name" "${RLP[@]}" --load "$OUT/ntp/ckpt" --save "$OUT/$name/ckpt" "$@"; }
variant rlp_uniform --objective rlp
variant rlp_entropy --objective rlp --rlp-positions entropy --rlp-entropy-top-fraction 0.25
variant rlp_curriculum --objective rlp --rlp-positions curriculum --rlp-entropy-top-fraction 0.25 \
  --rlp-curriculum-start 8 --rlp-curriculum-iters "$ITERS"
variant rlp_k2 --objective rlp --rlp-positions-per-doc 2
variant rpt --objective rpt --rlp-rpt-match-tokens 1 --rlp-positions entropy
variant rlp_ntp0.5 --objective rlp --rlp-ntp-weight 0.5

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
cols = ["rlp/info_gain", "rlp/reward", "rlp/s_pred", "rlp/s_ema", "rlp/thought_len",
        "rlp/closed_frac", "rlp/advantage_abs", "rlp/ntp_loss", "rlp/loss", "rlp/flops"]
print(f"\n{'variant':<15} {'iter':>4} " + " ".join(f"{c[4:]:>13}" for c in cols))
for d in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists() and p.name != "ntp"):
    for line in (d / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        print(f"{d.name:<15} {m['iteration']:>4} " + " ".join(
            f"{m[c]:>13.4g}" if c in m else f"{'—':>13}" for c in cols))
PYEOF
