#!/usr/bin/env bash
# Tiny CPU demo of the users' workflow on one checkpoint directory:
#   NTP pretraining (tiny Nemotron-H-style hybrid: Mamba-2 + attention + MLP, TP=2)
#   -> switch the same job to --objective rlp on its torch_dist checkpoint
#   -> switch back to NTP,
# with the in-loop evaluation on held-out positions every 2 iterations throughout; ends with the
# before/after table and the curves (python -m rlp_megatron.plot -> $OUT/rlp_curves.png).
# Runs the real Megatron-Core training loop on CPU over gloo (2 processes), ~2 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tools/setup_env.sh
PY=${PYTHON:-.venv/bin/python}
source examples/tiny_hybrid/model_flags.sh   # TINY_HYBRID_FLAGS, TINY_CPU_FLAGS, TINY_DATA_FLAGS
OUT=${OUT:-runs/tiny_cpu_demo}
rm -rf "$OUT"; mkdir -p "$OUT"
export OMP_NUM_THREADS=1

COMMON=("${TINY_HYBRID_FLAGS[@]}" "${TINY_CPU_FLAGS[@]}" "${TINY_DATA_FLAGS[@]}"
  --tensor-model-parallel-size 2 --micro-batch-size 2 --global-batch-size 8
  --log-interval 1 --eval-iters 0 --eval-interval 100000
  --save "$OUT/ckpt" --load "$OUT/ckpt" --save-interval 1000 --ckpt-format torch_dist
  --lr-decay-style constant --rlp-metrics-file "$OUT/metrics.jsonl"
  # RLP's settings, and the in-loop evaluation every 2 iterations in every phase (NTP too)
  --rlp-group-size 4 --rlp-thought-length 16 --rlp-context-length 32 --rlp-min-context 8
  --rlp-eval-interval 2 --rlp-eval-positions 4)

train() {  # train <phase> <flags...>: one torchrun job; prints Megatron's iteration lines
  echo "=== $1 ==="; shift
  "$PY" -m torch.distributed.run --nproc-per-node 2 --master-port "${PORT:-29561}" \
      -m rlp_megatron.train "${COMMON[@]}" "$@" 2>&1 | tee -a "$OUT/log.txt" \
    | grep -E "iteration +[0-9]+/|successfully saved|loading distributed checkpoint|EMA|Error|error:" \
    | sed -E 's/ \[[0-9-]+ [0-9:.]+\]//'
}

train "1. NTP pretraining, 8 iterations" --objective ntp --train-iters 8 --lr 1e-3 --min-lr 1e-3
train "2. same job, same checkpoint, now --objective rlp (G=4, thoughts <= 16 tokens)" \
  --objective rlp --train-iters 12 --lr 1e-4 --min-lr 1e-4 --override-opt-param-scheduler
train "3. back to NTP" --objective ntp --train-iters 14 --lr 1e-3 --min-lr 1e-3 \
  --override-opt-param-scheduler
echo "=== held-out evaluation before and after RLP, and the curves ==="
"$PY" -m rlp_megatron.plot "$OUT"
echo "metrics (one JSON line per iteration): $OUT/metrics.jsonl; checkpoints: $OUT/ckpt"
