# Tiny Nemotron-H-shaped hybrid (Mamba-2 + squared-ReLU MLP + GQA attention) for CPU runs and demos.
# Source it; it defines three bash arrays:
#
#   TINY_HYBRID_FLAGS  the model geometry: identical to TINY_HYBRID in tests/harness.py (keep them equal)
#   TINY_CPU_FLAGS     run Megatron-Core on CPU over gloo (harness.CPU_FLAGS)
#   TINY_DATA_FLAGS    mock data, NullTokenizer, 128-token vocabulary (harness.TINY_DATA)
#
#   source examples/tiny_hybrid/model_flags.sh
#   launch/local.sh 2 "${TINY_HYBRID_FLAGS[@]}" "${TINY_CPU_FLAGS[@]}" "${TINY_DATA_FLAGS[@]}" ...
#
# Same pattern shape as Nemotron-Nano-12B-v2 ("M-M-M-M*-..."): M = Mamba-2, - = MLP, * = attention.
# 8 layers so that PP=2 splits it evenly. Nothing but the sizes differs from the 12B recipe.

TINY_HYBRID_FLAGS=(
    --hybrid-layer-pattern "M-*-M-M-" --num-layers 8
    --hidden-size 64 --ffn-hidden-size 128
    --num-attention-heads 4 --group-query-attention --num-query-groups 2
    --mamba-num-heads 4 --mamba-head-dim 16 --mamba-state-dim 16 --mamba-num-groups 2
    --seq-length 64 --max-position-embeddings 64
    --position-embedding-type none --untie-embeddings-and-output-weights
    --normalization RMSNorm --squared-relu
)

TINY_CPU_FLAGS=(
    --transformer-impl local
    --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion
    --no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm
    --distributed-backend gloo --use-cpu-initialization
    --hidden-dropout 0 --attention-dropout 0
)

# 128 is a multiple of 64·TP for TP <= 2, so the padded vocabulary (and the layout) does not
# depend on TP.
TINY_DATA_FLAGS=(
    --mock-data --tokenizer-type NullTokenizer --vocab-size 128
    --make-vocab-size-divisible-by 64 --seed 1234
)
