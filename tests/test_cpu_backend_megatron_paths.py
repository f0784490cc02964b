"""Megatron code paths that reach the CPU backend (rlp_megatron.backends.cpu) in less obvious ways,
each once in-process (fast) and once through Megatron's real ``pretrain()`` on CPU/gloo (slow):

* activation recompute with the model-parallel RNG tracker: Megatron's ``CheckpointFunction``
  recomputes a layer inside its backward and calls ``torch.autograd.backward`` on it. That call is
  dispatched through the backend's torch-function mode, which is popped while it handles a call,
  so the whole nested backward (e.g. the sequence-parallel all-gather's
  ``torch.empty(device=torch.cuda.current_device())``) used to run without CUDA→CPU remapping:
  "Found no NVIDIA driver on your system". Megatron-LM's own
  ``tensor_parallel/test_random.py::test_checkpoint`` fails the same way.
* overlapped grad reduce with several distributed-optimizer instances: Megatron enters one
  ``torch.cuda.stream(...)`` object twice, which a generator context manager cannot do
  (``'_GeneratorContextManager' object has no attribute 'args'``); Megatron-LM's
  ``distributed/test_param_and_grad_buffer.py::test_grad_sync[2-*-True-True]`` fails the same way.

The pretraining runs are one short torchrun each (the start-up of two processes dominates); that
the recomputation replays the forward's dropout exactly is checked in-process, against Megatron's
own CheckpointFunction.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rlp_megatron  # noqa: F401  (enables the backend when there is no GPU)
from harness import TINY_GPT, TRAIN_FLAGS, read_jsonl, torchrun
from rlp_megatron.backends import cpu

pytestmark = pytest.mark.skipif(
    not cpu.cpu_backend_enabled(), reason="CUDA is available: the CPU backend is (rightly) off"
)

ITERS = 3
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]  # the recompute must replay it
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform",
             "--recompute-num-layers", "1"]
TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
DISTOPT = ["--use-distributed-optimizer"]
OVERLAP_2_INSTANCES = ["--overlap-grad-reduce", "--num-distributed-optimizer-instances", "2"]


def _train_losses(out: Path, *extra: str) -> list[float]:
    """lm loss of each iteration of a 2-process pretrain() run; it must learn."""
    metrics = out / "metrics.jsonl"
    torchrun(2, ["-m", "rlp_megatron.train", *TINY_GPT, *TRAIN_FLAGS,
                 "--train-iters", str(ITERS), "--rlp-metrics-file", str(metrics), *extra],
             timeout=300)
    records = read_jsonl(metrics)
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1)), records
    losses = [r["lm loss"] for r in records]
    print(f"lm loss {losses}")
    assert 4.0 < losses[0] < 5.5, losses  # ≈ ln(128) = 4.85 at initialisation
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    return losses


# --------------------------------------------------------------------------------------------
# In-process


class _AllocatesOnCurrentDeviceInBackward(torch.autograd.Function):
    """What Megatron's gather_split_1d_tensor / _gather_along_first_dim do in a backward."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        buf = torch.empty(grad.numel(), dtype=grad.dtype, device=torch.cuda.current_device())
        buf.copy_(grad.reshape(-1))
        return buf.view_as(grad) * 2


@pytest.mark.parametrize("entry", ["Tensor.backward", "autograd.backward", "autograd.grad"])
def test_backward_entered_through_the_mode_still_lands_on_cpu(entry):
    x = torch.ones(4, requires_grad=True)
    loss = _AllocatesOnCurrentDeviceInBackward.apply(x).sum()
    if entry == "Tensor.backward":
        loss.backward()
        grad = x.grad
    elif entry == "autograd.backward":
        torch.autograd.backward(loss)
        grad = x.grad
    else:
        (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, torch.full((4,), 2.0))


def test_megatron_checkpoint_recomputes_and_restores_the_rng_in_backward():
    """Megatron's activation checkpointing (distribute_saved_activations=False needs no TP group):
    the recomputation inside backward replays the forward's dropout mask, and its nested
    torch.autograd.backward runs under the backend."""
    from megatron.core.tensor_parallel.random import checkpoint

    def layer(x):
        y = torch.nn.functional.dropout(x, p=0.5, training=True)
        return _AllocatesOnCurrentDeviceInBackward.apply(y)

    torch.manual_seed(7)
    x = torch.ones(64, requires_grad=True)
    checkpoint(layer, False, x).sum().backward()
    torch.manual_seed(7)
    x_ref = torch.ones(64, requires_grad=True)
    layer(x_ref).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    assert 0 < int((x.grad == 0).sum()) < 64  # a dropout mask was applied (and replayed)


def test_one_cuda_stream_context_can_be_entered_twice():
    ctx = torch.cuda.stream(torch.cuda.Stream())
    entered = 0
    for _ in range(2):  # Megatron's start_grad_sync with several distributed-optimizer instances
        with ctx:  # a generator-based context manager raises here the second time
            torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
            entered += 1
    assert entered == 2
    with torch.cuda.stream(None):
        entered += 1
    assert entered == 3


# --------------------------------------------------------------------------------------------
# Megatron's pretrain() at world size 2


@pytest.mark.slow
def test_pretrain_with_full_recompute_at_tp2_sequence_parallel(tmp_path):
    losses = _train_losses(tmp_path, *TP2_SP, *DROPOUT, *RECOMPUTE)  # asserts it learns
    assert len(losses) == ITERS and losses[-1] < losses[0]


@pytest.mark.slow
def test_pretrain_with_overlapped_grad_reduce_and_two_distopt_instances(tmp_path):
    losses = _train_losses(tmp_path, *DISTOPT, *OVERLAP_2_INSTANCES)  # asserts it learns
    assert len(losses) == ITERS and losses[-1] < losses[0]
