#!/usr/bin/env bash
# The end-to-end demo (README command 1): does RLP do anything, here, on 2 CPU cores?
#
#   bash examples/demo/run.sh          # ~10 minutes on 2 cores after the one-time install
#
#   1. corpus     the King James Bible (Debian's bible-kjv, installed when missing), one document
#                 per chapter, 2% held out; a SentencePiece tokenizer with <think>/</think>;
#                 Megatron indexed datasets (tools/make_tiny_corpus.py). The NTP corpus teaches the
#                 thought format: half the training documents carry "<think> recall </think>" spans
#                 whose recall is a function of the context only (never of the next token).
#   2. NTP        pretraining of the tiny hybrid (Mamba-2 + attention + MLP, TP = 2) → torch_dist
#                 checkpoint; the held-out RLP evaluation runs throughout (φ = θ in an NTP run).
#   3. RLP        the same job and checkpoint switched to --objective rlp on the plain training
#                 text (no spans), TP = 2, the EMA teacher starting as φ ← θ.
#   4. report     the held-out before/after table and one PNG of the curves across the switch
#                 (python -m rlp_megatron.plot), and the wall time of each phase.
#
# Knobs (environment): OUT (runs/demo), NTP_ITERS, RLP_ITERS, RLP_LR, GROUP_SIZE, THOUGHT_LENGTH,
# NTP_EVAL_INTERVAL, EVAL_INTERVAL (RLP phase), EVAL_POSITIONS, RLP_SEED, CORPUS (a prepared corpus
# directory to reuse), SOURCE (the corpus tool's --source: kjv, stdlib, or a folder of .txt files).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
declare -a PHASES=()
phase_done() { PHASES+=("$(printf '%-34s %5ds' "$1" $((SECONDS - phase_start)))"); }

phase_start=$SECONDS
bash tools/setup_env.sh
phase_done "0. environment (tools/setup_env.sh)"
PY=${PYTHON:-.venv/bin/python}
source examples/tiny_hybrid/model_flags.sh   # TINY_HYBRID_FLAGS, TINY_CPU_FLAGS
OUT=${OUT:-runs/demo}
NTP_ITERS=${NTP_ITERS:-600}
RLP_ITERS=${RLP_ITERS:-200}
rm -rf "$OUT/ckpt" "$OUT/metrics.jsonl" "$OUT/log.txt"
mkdir -p "$OUT"
export OMP_NUM_THREADS=1

phase_start=$SECONDS
echo "=== 1. corpus: KJV → held-out split, tokenizer, indexed datasets ==="
DATA=${CORPUS:-$OUT/data}
if [ ! -f "$DATA/corpus.json" ]; then
  "$PY" tools/make_tiny_corpus.py "$DATA" --source "${SOURCE:-kjv}" --vocab-size 1024 \
    --think-context 32
fi
phase_done "1. corpus + tokenizer"

source examples/demo/flags.sh                # DEMO_FLAGS
COMMON=("${DEMO_FLAGS[@]}" --seed 1234 --rlp-seed "${RLP_SEED:-1}"
  --save "$OUT/ckpt" --load "$OUT/ckpt" --save-interval 100000
  --rlp-metrics-file "$OUT/metrics.jsonl")

train() {  # train <phase> <flags...>: one torchrun job; prints Megatron's iteration lines
  echo "=== $1 ==="; shift
  "$PY" -m torch.distributed.run --nproc-per-node 2 --master-port "${PORT:-29563}" \
      -m rlp_megatron.train "${COMMON[@]}" "$@" 2>&1 | tee -a "$OUT/log.txt" \
    | grep --line-buffered -E "iteration +[0-9]+/|successfully saved|loading distributed|EMA|Error|error:" \
    | sed -u -E 's/ \[[0-9-]+ [0-9:.]+\]//; s/\| (rlp\/(logprob|s_pred)_mismatch|rlp\/flops|rlp\/time|rlp\/skipped|number of|loss scale)[^|]*//g'
}

phase_start=$SECONDS
train "2. NTP pretraining, $NTP_ITERS iterations (32 × 64 tokens each), text with thought spans" \
  --objective ntp --train-iters "$NTP_ITERS" --lr 3e-3 --min-lr 3e-3 \
  --lr-warmup-iters $((NTP_ITERS < 40 ? NTP_ITERS / 2 : 20)) \
  --train-data-path "$DATA/train_think_text_document" --rlp-eval-interval "${NTP_EVAL_INTERVAL:-100}"
phase_done "2. NTP pretraining"

phase_start=$SECONDS
train "3. same checkpoint, --objective rlp: $RLP_ITERS iterations on the plain text" \
  --objective rlp --train-iters $((NTP_ITERS + RLP_ITERS)) --lr "${RLP_LR:-1e-4}" \
  --min-lr "${RLP_LR:-1e-4}" --lr-warmup-iters 0 --override-opt-param-scheduler \
  --train-data-path "$DATA/train_text_document" --rlp-eval-interval "${EVAL_INTERVAL:-25}"
phase_done "3. RLP"

phase_start=$SECONDS
echo "=== 4. held-out evaluation before and after RLP, and the curves ==="
"$PY" -m rlp_megatron.plot "$OUT"
phase_done "4. table + plot"
echo "=== wall time per phase ==="
printf '%s\n' "${PHASES[@]}"
printf '%-34s %5ds\n' "total" $((SECONDS - start))
echo "metrics (one JSON line per iteration): $OUT/metrics.jsonl; log: $OUT/log.txt"
