#!/usr/bin/env bash
# Does RLP learn here? The paired seed study behind README's demo section (issue 15, item 4).
#
#   bash examples/demo/run.sh                 # first: the demo (its NTP checkpoint is the start)
#   bash examples/demo/study.sh [DEMO_OUT]    # ~25 minutes on 2 cores: 3 seeds × 2 runs
#
# From the demo's NTP checkpoint (iteration NTP_ITERS), for each seed s in SEEDS: a treatment run
# (RLP at --lr RLP_LR) and a control run (--lr 1e-12: θ and φ stay put) for RLP_ITERS iterations.
# Treatment and control of one seed draw the same documents, positions and sampling noise
# (--seed, --rlp-seed; the noise is keyed by iteration and sample index), so their difference
# per iteration is the effect of learning alone; the held-out evaluation (rlp_eval/*) of the
# control stays at the starting model's value. Nothing is saved. Ends with
# examples/demo/paired.py's table.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DEMO=${1:-runs/demo}
DATA=${CORPUS:-$DEMO/data}
NTP_ITERS=${NTP_ITERS:-600}
RLP_ITERS=${RLP_ITERS:-200}
RLP_LR=${RLP_LR:-1e-4}
SEEDS=${SEEDS:-1 2 3}
STUDY=${STUDY:-$DEMO/study}
source examples/tiny_hybrid/model_flags.sh
source examples/demo/flags.sh
export OMP_NUM_THREADS=1
mkdir -p "$STUDY"

for seed in $SEEDS; do
  for arm in treatment control; do
    lr=$RLP_LR; [ "$arm" = control ] && lr=1e-12
    run="$STUDY/seed${seed}_$arm"
    if [ -f "$run/done" ]; then echo "=== seed $seed, $arm: done before ==="; continue; fi
    rm -rf "$run"; mkdir -p "$run"
    echo "=== seed $seed, $arm (--lr $lr): $RLP_ITERS RLP iterations from iteration $NTP_ITERS ==="
    "$PY" -m torch.distributed.run --nproc-per-node 2 --master-port "${PORT:-29565}" \
        -m rlp_megatron.train "${DEMO_FLAGS[@]}" --seed $((1233 + seed)) --rlp-seed "$seed" \
        --load "$DEMO/ckpt" --ckpt-step "$NTP_ITERS" --objective rlp \
        --train-iters $((NTP_ITERS + RLP_ITERS)) --lr "$lr" --min-lr "$lr" --lr-warmup-iters 0 \
        --override-opt-param-scheduler --train-data-path "$DATA/train_text_document" \
        --rlp-eval-interval "${EVAL_INTERVAL:-25}" --rlp-metrics-file "$run/metrics.jsonl" \
        > "$run/log.txt" 2>&1 || { tail -20 "$run/log.txt"; exit 1; }
    grep -E "iteration +[0-9]+/" "$run/log.txt" | tail -1 | cut -c1-160
    touch "$run/done"
  done
done
"$PY" examples/demo/paired.py "$STUDY"
