"""Log-prob kernels: one API, several implementations with identical results.

* :func:`vocab_parallel_logprobs` — per-token log-prob (and entropy) from vocab-parallel logits,
  never gathering the vocabulary, fp32 whatever the logits' dtype.
* :func:`fused_linear_logprobs` — the same from the hidden states and the vocab-parallel output
  weight, never materialising the logits (chunked over tokens and vocabulary, recomputed in
  backward).
* Gumbel-max sampling's per-shard pass (:mod:`.triton_sampling`, dispatched from
  :func:`rlp_megatron.rollout.sampling.gumbel_max_sample`, whose PyTorch path is the reference).

``impl``: ``"torch"`` (chunked PyTorch, :mod:`.torch_logprobs`: the reference and the CPU path),
``"triton"`` (:mod:`.triton_logprobs`, GPU; also runs under ``TRITON_INTERPRET=1``), ``"auto"``
(Triton for CUDA tensors when Triton imports, else PyTorch; ``RLP_MEGATRON_LOGPROB_IMPL=torch``
makes ``auto`` mean PyTorch everywhere, e.g. to rule the Triton kernels out on a new GPU). See the implementation modules for
the numerics and for why we wrote these rather than adopting a library kernel.
"""

from __future__ import annotations

import functools
import os

from rlp_megatron.kernels.torch_logprobs import (  # noqa: F401  (fp32_matmul: re-exported)
    fp32_matmul,
    fused_linear_logprobs_torch,
    vocab_parallel_logprobs_torch,
)

IMPLS = ("auto", "torch", "triton")


@functools.cache
def _triton_module():
    try:
        from rlp_megatron.kernels import triton_logprobs, triton_sampling
    except ImportError:
        return None
    return type("TritonKernels", (), {**vars(triton_logprobs), **vars(triton_sampling)})


def pick(impl: str, tensor, name: str):
    """The Triton function ``name`` if ``impl`` (and, for ``auto``, the tensor's device and
    ``RLP_MEGATRON_LOGPROB_IMPL``) selects Triton, else None (use the PyTorch path)."""
    return _pick(impl, tensor, name)


def _pick(impl: str, tensor, name: str):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto" and os.environ.get("RLP_MEGATRON_LOGPROB_IMPL", "auto") == "torch":
        impl = "torch"
    if impl == "torch":
        return None
    module = _triton_module()
    fn = getattr(module, name, None) if module is not None else None
    if impl == "triton":
        if fn is None:
            raise RuntimeError(f"rlp_megatron.kernels: no Triton {name} (is triton installed?)")
        return fn
    return fn if (fn is not None and tensor.is_cuda) else None


def vocab_parallel_logprobs(logits, targets, tp_group=None, *, vocab_start=0, vocab_size=None,
                            temperature=1.0, return_entropy=False, impl="auto"):
    """log softmax(logits / T)[targets] over the real vocabulary (ids < ``vocab_size``), fp32,
    shaped like ``targets``; ``logits`` [..., V_local] is this TP rank's shard of the ids
    ``[vocab_start, vocab_start + V_local)``. With ``return_entropy``: ``(logp, entropy)``, the
    entropy without gradient."""
    fn = _pick(impl, logits, "vocab_parallel_logprobs_triton") or vocab_parallel_logprobs_torch
    return fn(logits, targets, tp_group, vocab_start=vocab_start, vocab_size=vocab_size,
              temperature=temperature, return_entropy=return_entropy)


def fused_linear_logprobs(hidden, weight, targets, tp_group=None, *, chunk_size=1024,
                          vocab_start=0, vocab_size=None, temperature=1.0, return_entropy=False,
                          impl="auto"):
    """:func:`vocab_parallel_logprobs` of ``hidden @ weight.T`` (``hidden`` [..., H], ``weight``
    [V_local, H]) without materialising the logits; the backward gives ``hidden`` its full
    gradient (all-reduced over ``tp_group``) and ``weight`` this shard's."""
    fn = _pick(impl, hidden, "fused_linear_logprobs_triton") or fused_linear_logprobs_torch
    return fn(hidden, weight, targets, tp_group, chunk_size=chunk_size, vocab_start=vocab_start,
              vocab_size=vocab_size, temperature=temperature, return_entropy=return_entropy)
