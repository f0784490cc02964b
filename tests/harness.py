"""Shared helpers for tests that launch real Megatron-Core processes on CPU/gloo via torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One CPU-safe flag set; every tiny model below adds its geometry to it.
CPU_FLAGS = [
    "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
    "--distributed-backend", "gloo", "--use-cpu-initialization",
    "--hidden-dropout", "0", "--attention-dropout", "0",
]

# Vocab padding must not depend on TP (128 is a multiple of 64·TP for TP ≤ 2), else layouts differ.
TINY_DATA = [
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--make-vocab-size-divisible-by", "64", "--seed", "1234",
]

TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
    "--normalization", "RMSNorm", "--swiglu",
    *CPU_FLAGS, *TINY_DATA,
]

# Nemotron-H style pattern scaled down (Mamba, MLP and attention layers; 8 so PP=2 splits evenly).
TINY_HYBRID = [
    "--hybrid-layer-pattern", "M-*-M-M-", "--num-layers", "8",
    "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--mamba-num-heads", "4", "--mamba-head-dim", "16", "--mamba-state-dim", "16",
    "--mamba-num-groups", "2",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--position-embedding-type", "none", "--untie-embeddings-and-output-weights",
    "--normalization", "RMSNorm", "--squared-relu",
    *CPU_FLAGS, *TINY_DATA,
]

TRAIN_FLAGS = [
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-3",
    "--lr-decay-style", "constant", "--log-interval", "1", "--eval-iters", "0",
    "--eval-interval", "1000",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, target: list[str], *, timeout: int = 600, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run --nproc-per-node N <target...>` from the repo root."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *target,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"torchrun failed (rc={proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def decode_vs_teacher_forcing(rollout: dict):
    """|decode-time − teacher-forced log-prob| of every thought token of a dumped rollout (the
    quantity rlp/logprob_mismatch logs), as one flat tensor."""
    import torch

    diffs = []
    for i, behaviour in enumerate(rollout["behaviour_logprobs"]):
        tf = rollout["old_logp"][i][rollout["thought_mask"][i] > 0]
        assert tf.shape == behaviour.shape
        diffs.append((behaviour - tf).abs())
    return torch.cat(diffs)


def load_plain(path) -> dict:
    """The tensors of a dist checkpoint (e.g. gradients saved by tests/workers/rlp_run.py
    --record-grads), in the global layout, loaded in this process."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    tensors = dist_checkpointing.load_plain_tensors(str(path))
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def assert_same_gradients(dir_a, dir_b, iterations: int, name: str, tol: float = 1e-5) -> None:
    """Gradients of every step (rlp_run.py --record-grads), compared in the global layout."""
    for it in range(1, iterations + 1):
        ga = load_plain(Path(dir_a) / "snapshots" / f"grads_iter{it}")
        gb = load_plain(Path(dir_b) / "snapshots" / f"grads_iter{it}")
        assert ga.keys() == gb.keys() and ga
        worst = max((ga[k] - gb[k]).abs().max().item() for k in ga)
        scale = max(v.abs().max().item() for v in ga.values())
        print(f"{name} step {it}: max |grad diff| = {worst:.3g} (max |grad| {scale:.3g})")
        assert scale > 1e-4 and worst <= tol, (name, it)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


TINY_HYBRID_PATTERN = "M*-M-"


def tiny_hybrid(normalization="RMSNorm", pattern=None, hidden_size=64):
    """A small Megatron HybridModel (Mamba, attention with RoPE, MLP) built in-process from
    ``hybrid_local_stack_spec``, fp32, vocabulary 97; needs the ``model_parallel`` fixture."""
    import torch
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.transformer import TransformerConfig

    from rlp_megatron.specs import hybrid_local_stack_spec

    config = TransformerConfig(
        num_layers=len(pattern or TINY_HYBRID_PATTERN), hidden_size=hidden_size,
        ffn_hidden_size=2 * hidden_size,
        num_attention_heads=4,
        mamba_num_heads=4, mamba_head_dim=16, mamba_state_dim=16, mamba_num_groups=2,
        normalization=normalization, gradient_accumulation_fusion=False,
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, use_cpu_initialization=True,
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = HybridModel(
        config, hybrid_local_stack_spec, vocab_size=97, max_sequence_length=64,
        hybrid_layer_pattern=pattern or TINY_HYBRID_PATTERN, position_embedding_type="rope",
    )
    # A small chunk size makes the 20-token forward span several chunks.
    for layer in model.decoder.layers:
        if hasattr(layer, "mixer"):
            layer.mixer.chunk_size = 8
    return model
