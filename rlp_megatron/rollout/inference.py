"""Forward passes through Megatron's static inference context (KV cache and Mamba states).

Thin wrappers around ``model(..., inference_context=ctx)`` that keep the bookkeeping Megatron
leaves to its engines in one place: ``sequence_len_offset`` advances by the number of tokens fed,
logits stay vocab-parallel (never gathered), and the cache can be replicated along the batch
dimension so that one prefill per context serves G rollouts.

Every tensor that reaches the attention core is dense. Megatron's static path hands attention
``memory[:seq_end, batch_start:batch_end]``; that is a dense tensor only when the batch range is
the whole cache. Transformer Engine's fused (cuDNN) attention assumes dense ``sbhd`` inputs and
recomputes strides from the shape, so a batch slice of a larger cache would be misread. Hence the
prefill runs in a context sized for exactly the distinct prompts, and :func:`reindex_context`
builds the decode context (a prefilled context repeated G-fold, finished rows dropped) by
``index_select`` into new, dense buffers sized for exactly the rows being decoded.

Keys enter the cache already rotated (``rotated_key_cache``, :mod:`rlp_megatron.megatron_fixes`
fix 9): a decode step rotates one key per row instead of the whole cached sequence, so its cost
does not grow with the position through RoPE.

Mamba's recurrent (SSM) state is allocated in fp32 here, not in the parameters' dtype as
Megatron's mixer would: the training scan accumulates the state in fp32, and a bf16 state would
round it at every one of up to thousands of decode steps. The conv state holds raw inputs and
stays in the parameters' dtype.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.utils import InferenceMode
from megatron.core.utils import get_attr_wrapped_model

from rlp_megatron.logprobs import (LogprobRequest, rlp_output_processor,  # noqa: F401
                                   token_logprobs)  # (token_logprobs: re-exported)


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


def _static_context(max_batch_size: int, max_sequence_length: int) -> StaticInferenceContext:
    ctx = StaticInferenceContext(max_batch_size, max_sequence_length)
    ctx.rotated_key_cache = True  # keys enter the cache rotated (megatron_fixes fix 9)
    return ctx


def new_context(model, max_batch_size: int, max_sequence_length: int) -> StaticInferenceContext:
    """A static context for ``max_batch_size`` rows, with this stage's Mamba states allocated
    (SSM state in fp32, see the module docstring)."""
    ctx = _static_context(max_batch_size, max_sequence_length)
    for layer_number, mixer in _mamba_mixers(model).items():
        conv_shape, ssm_shape = mixer.mamba_state_shapes_per_request()
        conv = torch.zeros(max_batch_size, *conv_shape, device=mixer.conv1d_weight.device,
                           dtype=mixer.conv1d_weight.dtype)
        ssm = torch.zeros(max_batch_size, *ssm_shape, device=mixer.conv1d_weight.device,
                          dtype=torch.float32)
        ctx.key_value_memory_dict[layer_number] = (conv, ssm)
        mixer.cached_batch_size = max_batch_size
    return ctx


def forward_with_cache(model, tokens: torch.Tensor, ctx: StaticInferenceContext,
                       pipeline: "Pipeline | None" = None,
                       request: LogprobRequest | None = None) -> torch.Tensor | None:
    """Feed ``tokens`` [b, s] at positions ctx.sequence_len_offset... ; returns the vocab-parallel
    logits of the last position, [b, V/tp], on the last pipeline stage (None elsewhere).
    With a ``last_logits`` ``request`` they come from the final hidden states through
    :func:`rlp_megatron.logprobs.rlp_output_processor` (fp32, padding masked, the output layer
    never runs); without, from Megatron's output layer over every fed position.

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
    processor = {}
    if request is not None:
        processor = dict(output_processor=rlp_output_processor, output_processor_context=request)
    out = model(tokens, position_ids, None, inference_context=ctx, runtime_gather_output=True,
                **processor)
    ctx.sequence_len_offset += s
    if pipeline is not None and not pipeline.is_last:
        pipeline.send_hidden(out)
        return None
    return out if request is not None else out[:, -1, :]


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


@torch.no_grad()
def compare_decode_to_teacher_forcing(model, tokens: torch.Tensor, prefill_len: int):
    """Per-token log-probs of ``tokens[:, prefill_len:]`` from KV-cache decoding and from one
    teacher-forced forward. Returns (decode [b, n], teacher_forced [b, n])."""
    b, s = tokens.shape
    ctx = new_context(model, b, s)
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


def reindex_context(model, ctx: StaticInferenceContext,
                    index: torch.Tensor) -> StaticInferenceContext:
    """A new context of ``len(index)`` rows whose row i is ``ctx``'s row ``index[i]`` (an index
    may repeat: one prefilled context becomes G rows; rows left out are dropped), in new dense
    buffers: attention KV memory is [max_seq, batch, ...], of which the positions written so far
    are copied; Mamba conv/SSM states are [batch, ...]. ``ctx`` is left as it was."""
    mixers = _mamba_mixers(model)
    n, filled = len(index), ctx.sequence_len_offset
    out = _static_context(n, ctx.max_sequence_length)
    out.sequence_len_offset = filled
    for layer_number, (a, b) in ctx.key_value_memory_dict.items():
        if layer_number in mixers:
            out.key_value_memory_dict[layer_number] = (a.index_select(0, index),
                                                       b.index_select(0, index))
            mixers[layer_number].cached_batch_size = n
            continue
        pair = []
        for memory in (a, b):
            new = memory.new_empty((memory.shape[0], n, *memory.shape[2:]))
            torch.index_select(memory[:filled], 1, index, out=new[:filled])
            pair.append(new)
        out.key_value_memory_dict[layer_number] = tuple(pair)
    return out
