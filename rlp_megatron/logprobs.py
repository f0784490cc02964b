"""The numerics of RLP's log-probabilities: fp32, the real vocabulary, no gather, no logits.

RLP's reward is a difference of two log-likelihoods of one token, S_pred − S_EMA, and the
group-relative advantage subtracts rewards that often differ by a few hundredths of a nat. So:

* **No logits (``--rlp-logprobs fused``, the default).** Every RLP forward (rollout, scoring,
  teacher, update) hands Megatron an ``output_processor`` (:func:`rlp_output_processor`; for the
  hybrid model through the seam that :mod:`rlp_megatron.megatron_fixes` adds): Megatron's output
  layer is never asked for logits. The processor takes the final hidden states and the output
  weight (the shared embedding when tied) and computes what the phase needs with
  :mod:`rlp_megatron.kernels`: the per-token log-probs of the update and the scoring (never
  materialising [tokens × V/TP] logits), S_pred and S_EMA from the one position they score
  ([rows × H] @ [H × V/TP], not the whole window's logits), and for decoding the last position's
  logits only (prefill included). NTP iterations keep Megatron's own loss path.
* **fp32.** Products and sums run in fp32 whatever the parameters' dtype. Under ``--bf16``
  Megatron's output layer runs its GEMM in bf16 and rounds each logit to 8 bits of mantissa (up to
  0.06 nats at logits of 16–32) before ``Float16Module`` casts it to fp32; every product of two
  bf16 numbers is exact in fp32, so the kernels' error is fp32 accumulation only.
* **The real vocabulary.** Megatron pads the vocabulary (``--make-vocab-size-divisible-by``) and
  the padded rows of the output weight are ordinary, trained parameters: their logits are finite
  and can win a sample. :class:`VocabShard` masks them (−inf) wherever RLP samples or scores, so
  thoughts only contain real tokens and every log-prob is over the distribution that sampled.
* **No gather.** Each TP rank reduces its vocabulary shard to a few numbers per token (max,
  sum-exp, the target's logit on its owning shard) and two all-reduces merge them, with an
  autograd-correct backward (the hidden states' gradient is summed over the shards).

``--rlp-logprobs logits`` keeps Megatron's output layer (made fp32 by :func:`fp32_output_layer`)
and scores its vocab-parallel logits with :func:`rlp_megatron.kernels.vocab_parallel_logprobs`: the
reference the fused path is tested against, and a fallback for models whose output layer does more
than a matmul.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core.utils import get_attr_wrapped_model

from rlp_megatron import kernels

LOGPROBS = ("fused", "logits")  # --rlp-logprobs


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This TP rank's slice ``[start, start + size)`` of the padded vocabulary, the real
    vocabulary size (ids ≥ ``vocab_size`` are padding) and the TP group that holds the others."""

    start: int
    size: int
    vocab_size: int
    tp_group: object = dataclasses.field(default=None, compare=False)

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


def vocab_shard(chunk, tp_rank: int, vocab_size: int, tp_group=None) -> VocabShard | None:
    weight = output_weight(chunk)
    if weight is None:
        return None
    local = int(weight.shape[0])
    return VocabShard(start=tp_rank * local, size=local, vocab_size=vocab_size, tp_group=tp_group)


def token_logprobs(vocab_parallel_logits: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, vocab: VocabShard | None = None,
                   entropy: bool = False):
    """log softmax(logits / T)[target] over the real vocabulary, without gathering it; any
    leading shape. fp32. Without ``vocab``: the full, unpadded vocabulary on one rank. With
    ``entropy``: (log-probs, entropies of softmax(logits / T))."""
    if vocab is None:
        vocab = VocabShard(0, vocab_parallel_logits.shape[-1], vocab_parallel_logits.shape[-1])
    return kernels.vocab_parallel_logprobs(
        vocab_parallel_logits, targets, vocab.tp_group, vocab_start=vocab.start,
        vocab_size=vocab.vocab_size, temperature=temperature, return_entropy=entropy)


# ---------------------------------------------------------------------------------------------
# The output processor: what each RLP forward asks of the last stage instead of logits


@dataclasses.dataclass(frozen=True)
class LogprobRequest:
    """``output_processor_context`` of one RLP forward. The processor returns, for [b, s] inputs:

    * ``last_logits``: the last position's vocab-parallel logits, fp32, padding at −inf, [b, V/tp]
      (decoding);
    * else, with ``labels`` [b, s] and ``entropy``: log-probs of the labels at ``temperature``
      and the entropy of each position's distribution, [b, s, 2] (position selection);
    * else, with ``labels`` [b, s]: log-probs of the labels at ``temperature``, [b, s] — and with
      ``target_pos`` [b] as well, S at T = 1 of ``labels[i, target_pos[i]]`` appended as column s,
      [b, s + 1] (scoring);
    * else, with ``target_pos`` and ``targets`` [b]: S at T = 1 of ``targets`` at ``target_pos``,
      [b] (the teacher).
    """

    vocab: VocabShard
    labels: torch.Tensor | None = None
    target_pos: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    temperature: float = 1.0
    last_logits: bool = False
    entropy: bool = False
    chunk_size: int = 1024


def last_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab: VocabShard) -> torch.Tensor:
    """[b, V/tp] fp32 logits of [b, h] hidden states, padded ids at −inf (what decoding samples
    from: one position per row, so materialising its logits costs nothing)."""
    return vocab.mask_padding(kernels.fp32_matmul(hidden, weight.T))


def rlp_output_processor(*, hidden_states, output_layer, output_weight, context: LogprobRequest,
                         config=None, **_):
    """Megatron's ``output_processor`` for RLP forwards (see :class:`LogprobRequest`)."""
    weight = output_weight if output_weight is not None else output_layer.weight
    if getattr(output_layer, "bias", None) is not None:
        raise NotImplementedError("rlp_megatron: an output layer with a bias")
    if getattr(output_layer, "sequence_parallel", False):
        raise NotImplementedError("rlp_megatron: sequence parallelism (refused at startup)")
    vocab = context.vocab
    hidden = hidden_states.transpose(0, 1)  # [s, b, h] -> [b, s, h]
    if context.last_logits:
        return last_logits(hidden[:, -1], weight, vocab)

    def logprobs(h, targets, temperature, entropy=False):
        return kernels.fused_linear_logprobs(
            h, weight, targets, vocab.tp_group, chunk_size=context.chunk_size,
            vocab_start=vocab.start, vocab_size=vocab.vocab_size, temperature=temperature,
            return_entropy=entropy)

    if context.entropy:
        return torch.stack(logprobs(hidden, context.labels, context.temperature, True), dim=-1)

    s_target = None
    if context.target_pos is not None:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        targets = (context.targets if context.targets is not None
                   else context.labels[rows, context.target_pos])
        with torch.no_grad():  # S_pred / S_EMA are rewards: constants of the loss
            s_target = logprobs(hidden[rows, context.target_pos], targets, 1.0)
        if context.labels is None:
            return s_target
    logp = logprobs(hidden, context.labels, context.temperature)
    return logp if s_target is None else torch.cat([logp, s_target[:, None]], dim=1)


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
