"""The numerics of RLP's log-probabilities: fp32 logits, the real vocabulary, no gather.

RLP's reward is a difference of two log-likelihoods of one token, S_pred − S_EMA, and the
group-relative advantage subtracts rewards that often differ by a few hundredths of a nat. So:

* **fp32 logits.** Megatron's output layer runs its GEMM in the parameters' dtype: under
  ``--bf16`` each logit is rounded to bf16 (8 bits of mantissa: up to 0.06 nats at logits of
  16–32) before ``Float16Module`` casts it to fp32. :func:`fp32_output_layer` makes the output
  layer of the RLP forwards (rollout, scoring, teacher, update) multiply the bf16 hidden states
  by the bf16 output weight in fp32 (every product of two bf16 numbers is exact in fp32, and the
  sum accumulates in fp32), with gradients flowing back to both in their own dtype. NTP
  iterations keep Megatron's path. In fp32 runs it changes nothing and is not installed.
* **The real vocabulary.** Megatron pads the vocabulary (``--make-vocab-size-divisible-by``) and
  the padded rows of the output weight are ordinary, trained parameters: their logits are finite
  and can win a sample. :class:`VocabShard` masks them (−inf) wherever RLP samples or scores, so
  thoughts only contain real tokens and every log-prob is over the distribution that sampled.
* **No gather.** Log-probs come from vocab-parallel logits through Megatron's
  ``vocab_parallel_cross_entropy`` (max and sum-exp reduced over TP, the target's logit on its
  owning shard, an autograd-correct backward).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core import tensor_parallel
from megatron.core.utils import get_attr_wrapped_model


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This TP rank's slice ``[start, start + size)`` of the padded vocabulary, and the real
    vocabulary size (ids ≥ ``vocab_size`` are padding)."""

    start: int
    size: int
    vocab_size: int

    @property
    def has_padding(self) -> bool:
        return self.start + self.size > self.vocab_size

    def mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [..., size] with padded ids at −inf (out of place; a no-op without padding)."""
        if not self.has_padding:
            return logits
        ids = torch.arange(self.start, self.start + self.size, device=logits.device)
        return logits.masked_fill(ids >= self.vocab_size, float("-inf"))


def output_weight(chunk) -> torch.Tensor | None:
    """The output layer's weight on the last pipeline stage (the shared embedding when
    embeddings are tied, Megatron's default); None on other stages."""
    if not get_attr_wrapped_model(chunk, "post_process"):
        return None
    if get_attr_wrapped_model(chunk, "share_embeddings_and_output_weights"):
        return get_attr_wrapped_model(chunk, "shared_embedding_or_output_weight")()
    return get_attr_wrapped_model(chunk, "output_layer").weight


def vocab_shard(chunk, tp_rank: int, vocab_size: int) -> VocabShard | None:
    weight = output_weight(chunk)
    if weight is None:
        return None
    local = int(weight.shape[0])
    return VocabShard(start=tp_rank * local, size=local, vocab_size=vocab_size)


def token_logprobs(vocab_parallel_logits: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, vocab: VocabShard | None = None) -> torch.Tensor:
    """log softmax(logits / T)[target] over the real vocabulary, without gathering it; any
    leading shape. Computed in fp32."""
    logits = vocab_parallel_logits.float()
    if vocab is not None:
        logits = vocab.mask_padding(logits)
    if temperature != 1.0:
        logits = logits / temperature
    flat = logits.reshape(-1, 1, logits.shape[-1])
    return -tensor_parallel.vocab_parallel_cross_entropy(flat, targets.reshape(-1, 1)).reshape(
        targets.shape
    )


def _output_layers(model_chunks):
    for chunk in model_chunks:
        if get_attr_wrapped_model(chunk, "post_process"):
            yield get_attr_wrapped_model(chunk, "output_layer")


@contextlib.contextmanager
def fp32_output_layer(model_chunks):
    """Inside the block the output layers compute ``hidden @ weight.T`` in fp32 (see the module
    docstring); outside it they are Megatron's again. A no-op for fp32 parameters."""
    patched = []
    for layer in _output_layers(model_chunks):
        # Tied embeddings at PP=1: the layer has no weight of its own (it gets the embedding's).
        dtype = layer.weight.dtype if layer.weight is not None else layer.config.params_dtype
        if dtype == torch.float32:
            continue
        original = layer._forward_impl

        def forward_impl(input, weight, bias, gradient_accumulation_fusion, *args,
                         _original=original, **kwargs):
            # The fused wgrad path accumulates into weight.main_grad of the bf16 parameter;
            # here the weight is an fp32 view of it, so its gradient takes the regular path
            # (param.grad, which Megatron's DDP hook adds to main_grad).
            return _original(input.float(), weight.float(),
                             None if bias is None else bias.float(), False, *args, **kwargs)

        layer._forward_impl = forward_impl
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer._forward_impl  # back to the class method
