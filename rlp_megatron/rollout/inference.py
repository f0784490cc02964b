"""Forward passes through Megatron's static inference context (KV cache and Mamba states).

Thin wrappers around ``model(..., inference_context=ctx)`` that keep the bookkeeping Megatron
leaves to its engines in one place: ``sequence_len_offset`` advances by the number of tokens fed,
logits stay vocab-parallel (never gathered), and the cache can be replicated along the batch
dimension so that one prefill per context serves G rollouts.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.utils import InferenceMode
from megatron.core.utils import get_attr_wrapped_model


@contextlib.contextmanager
def inference_mode(model):
    """Run ``model`` as Megatron's inference engines do, and leave that state cleanly on exit.

    * ``InferenceMode`` on: Mamba mixers only read/update their cached conv/SSM states under it.
    * ``eval()``: no dropout while sampling; the previous train/eval mode is restored.
    * Vocab-parallel output: under ``InferenceMode`` Megatron asserts that logits are gathered
      across TP ranks; we pass ``runtime_gather_output=True`` to satisfy the assertion and make the
      output layer skip the gather, so sampling and log-probs stay on vocab shards.
    * ``torch.no_grad()`` rather than ``torch.inference_mode()``: tensors made here (thought
      tokens) feed a later forward with grad.
    Megatron's own engines leave ``InferenceMode`` set after they run; this context always unsets it.
    """
    was_training = model.training
    output_layer = None
    if get_attr_wrapped_model(model, "post_process"):
        output_layer = get_attr_wrapped_model(model, "output_layer")
    if output_layer is not None:
        original_forward = output_layer.forward

        def forward(input_, weight=None, runtime_gather_output=None, **kwargs):
            return original_forward(input_, weight=weight, runtime_gather_output=False, **kwargs)

        output_layer.forward = forward
    model.eval()
    InferenceMode.set_active()
    try:
        with torch.no_grad():
            yield
    finally:
        InferenceMode.unset_active()
        if output_layer is not None:
            del output_layer.forward  # back to the class method
        model.train(was_training)


def new_context(max_batch_size: int, max_sequence_length: int) -> StaticInferenceContext:
    return StaticInferenceContext(max_batch_size, max_sequence_length)


def forward_with_cache(model, tokens: torch.Tensor, ctx: StaticInferenceContext,
                       pipeline: "Pipeline | None" = None) -> torch.Tensor | None:
    """Feed ``tokens`` [b, s] at positions ctx.sequence_len_offset... ; returns the vocab-parallel
    logits of the last position, [b, V/tp], on the last pipeline stage (None elsewhere).

    With pipeline parallelism the stages run one after another: a stage receives the previous
    stage's hidden states [s, b, h], runs its layers (each stage caches its own layers' KV and
    Mamba states) and sends its hidden states on. Logits never leave the last stage."""
    b, s = tokens.shape
    start = ctx.sequence_len_offset
    position_ids = torch.arange(start, start + s, device=tokens.device)[None].expand(b, s)
    if s > 1:
        ctx.enable_prefill_mode()
    else:
        ctx.enable_decode_mode()
    if pipeline is not None and not pipeline.is_first:
        get_attr_wrapped_model(model, "set_input_tensor")(pipeline.recv_hidden(s, b))
    out = model(tokens, position_ids, None, inference_context=ctx, runtime_gather_output=True)
    ctx.sequence_len_offset += s
    if pipeline is not None and not pipeline.is_last:
        pipeline.send_hidden(out)
        return None
    return out[:, -1, :]


class Pipeline:
    """Point-to-point hops of a stage-by-stage decode: hidden states forward to the next stage,
    sampled token ids (one int64 per row) from the last stage to all stages."""

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        from megatron.core import mpu

        self.group = mpu.get_pipeline_model_parallel_group()
        self.size = mpu.get_pipeline_model_parallel_world_size()
        self.rank = mpu.get_pipeline_model_parallel_rank()
        self.is_first = self.rank == 0
        self.is_last = self.rank == self.size - 1
        self.next = mpu.get_pipeline_model_parallel_next_rank()
        self.prev = mpu.get_pipeline_model_parallel_prev_rank()
        self.hidden_size = hidden_size
        self.dtype = dtype

    def send_hidden(self, hidden: torch.Tensor) -> None:
        torch.distributed.send(hidden.contiguous(), dst=self.next)

    def recv_hidden(self, s: int, b: int) -> torch.Tensor:
        buf = torch.empty((s, b, self.hidden_size), dtype=self.dtype,
                          device=torch.cuda.current_device())
        torch.distributed.recv(buf, src=self.prev)
        return buf

    def broadcast_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        torch.distributed.broadcast(tokens, group=self.group, group_src=self.size - 1)
        return tokens


def token_logprobs(vocab_parallel_logits: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] without gathering the vocabulary; any leading shape."""
    logits = vocab_parallel_logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    flat = logits.reshape(-1, 1, logits.shape[-1])
    return -tensor_parallel.vocab_parallel_cross_entropy(flat, targets.reshape(-1, 1)).reshape(
        targets.shape
    )


@torch.no_grad()
def compare_decode_to_teacher_forcing(model, tokens: torch.Tensor, prefill_len: int):
    """Per-token log-probs of ``tokens[:, prefill_len:]`` from KV-cache decoding and from one
    teacher-forced forward. Returns (decode [b, n], teacher_forced [b, n])."""
    b, s = tokens.shape
    ctx = new_context(b, s)
    decode = []
    with inference_mode(model):
        last = forward_with_cache(model, tokens[:, :prefill_len], ctx)
        for i in range(prefill_len, s):
            decode.append(token_logprobs(last, tokens[:, i]))
            if i + 1 < s:
                last = forward_with_cache(model, tokens[:, i : i + 1], ctx)
    position_ids = torch.arange(s)[None].expand(b, s)
    full = model(tokens, position_ids, None)  # [b, s, V/tp]
    tf = token_logprobs(full[:, prefill_len - 1 : s - 1], tokens[:, prefill_len:])
    return torch.stack(decode, dim=1), tf


def _mamba_mixers(model):
    return {m.layer_number: m for m in model.modules()
            if hasattr(m, "cached_batch_size") and hasattr(m, "layer_number")}


def replicate_cache(model, ctx: StaticInferenceContext, index: torch.Tensor) -> None:
    """Expand the cache from the prefilled rows to ``len(index)`` rows: row i ← row index[i].

    Attention KV memory is [max_seq, max_batch, ...] (batch dim 1, allocated at max_batch_size);
    Mamba conv/SSM states are [batch, ...] (batch dim 0, allocated at the prefill batch size, and
    their mixer re-zeroes them when the batch size changes unless told the new size)."""
    mixers = _mamba_mixers(model)
    n = len(index)
    for layer_number, (a, b) in list(ctx.key_value_memory_dict.items()):
        if layer_number in mixers:
            ctx.key_value_memory_dict[layer_number] = (a[index].clone(), b[index].clone())
            mixers[layer_number].cached_batch_size = n
        else:
            a[:, :n] = a[:, index].clone()
            b[:, :n] = b[:, index].clone()
