# The demo's training flags, shared by run.sh (the demo) and study.sh (the paired seed study).
# Source after examples/tiny_hybrid/model_flags.sh with DATA set (a tools/make_tiny_corpus.py
# directory); defines DEMO_FLAGS: the tiny hybrid at TP = 2 on 2 CPU processes, 32 × 64 tokens per
# iteration, the corpus's tokenizer and held-out split, and RLP's settings (G thoughts of ≤ 8
# tokens after a context of ≤ 32 tokens; the held-out evaluation on K validation positions).
DEMO_FLAGS=("${TINY_HYBRID_FLAGS[@]}" "${TINY_CPU_FLAGS[@]}"
  --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model"
  --make-vocab-size-divisible-by 64 --valid-data-path "$DATA/valid_text_document"
  --tensor-model-parallel-size 2 --micro-batch-size 16 --global-batch-size 32
  --log-interval 5 --eval-iters 0 --eval-interval 100000 --ckpt-format torch_dist
  --lr-decay-style constant
  --rlp-group-size "${GROUP_SIZE:-8}" --rlp-thought-length "${THOUGHT_LENGTH:-8}"
  --rlp-context-length 32 --rlp-min-context 8 --rlp-eval-positions "${EVAL_POSITIONS:-64}")
