"""The Megatron forwards that the RLP phases share: rows cut into micro-batches, Megatron's
schedule run forward-only, the ``output_processor`` request, micro-batches of different widths
through the pipeline schedule, and rows gathered over data-parallel ranks."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import mpu
from megatron.core.pipeline_parallel import get_forward_backward_func

from rlp_megatron.logprobs import LogprobRequest, rlp_output_processor


def to_device(mb: dict) -> dict:
    return {k: v.cuda(non_blocking=True) for k, v in mb.items()}


def micro_batches(fields: dict, mbs: int, trim: bool = False,
                   sizes: list[int] | None = None) -> list[dict]:
    """Consecutive rows in micro-batches of ``mbs`` (or of ``sizes``); with ``trim``, each cut to
    its own longest row (``target_pos`` + 1) instead of the step's."""
    n, width = fields["tokens"].shape
    if sizes is None:
        sizes = [min(mbs, n - i) for i in range(0, n, mbs)]
    out, i = [], 0
    for size in sizes:
        mb = {k: v[i : i + size] for k, v in fields.items()}
        i += size
        if trim:
            w = int(mb["target_pos"].max()) + 1
            mb = {k: v[:, :w] if v.dim() > 1 and v.shape[1] == width else v
                  for k, v in mb.items()}
        out.append(mb)
    return out


@contextlib.contextmanager
def variable_seq_lengths(model):
    """Megatron's pipeline schedules exchange each micro-batch's shape before its activations
    (``config.variable_seq_lengths``; Megatron's argument parser always sets it False, since NTP
    windows have one length), so RLP's micro-batches, each cut to its own longest row, can differ
    in width at PP > 1. Costs one small send per micro-batch and stage; NTP iterations
    (``--rlp-ntp-every``) keep the fixed-shape path."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    saved = config.variable_seq_lengths
    config.variable_seq_lengths = True
    try:
        yield
    finally:
        config.variable_seq_lengths = saved


def processor(request: LogprobRequest) -> dict:
    return dict(output_processor=rlp_output_processor, output_processor_context=request)


def forward_only(model, batches, forward_step, seq_length, mbs):
    """Megatron's schedule, forward only; returns per-micro-batch dicts on the last stage."""
    with torch.no_grad(), variable_seq_lengths(model):
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=mbs,
            forward_only=True, collect_non_loss_data=True)
    return out if mpu.is_pipeline_last_stage() else None


def all_gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """Concatenation of every rank's ``local`` [n_rank, k] (n_rank may differ, even be 0)."""
    size = dist.get_world_size(group)
    if size == 1:
        return local
    n = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    counts = [torch.empty_like(n) for _ in range(size)]
    dist.all_gather(counts, n, group=group)
    counts = [int(c) for c in counts]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])
