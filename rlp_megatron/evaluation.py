"""In-loop RLP evaluation: ``--rlp-eval-interval N``, ``--rlp-eval-positions K``.

Every N iterations — in RLP runs and in NTP runs alike, so that a job's switch from NTP to RLP
shows on one curve — the current θ (and φ) are measured on a fixed held-out set:

* the first K samples of Megatron's **validation** split (the same windows every time; the split
  is built with at least K samples), one uniform position each, drawn as in training with
  ``--rlp-seed`` keyed by the sample's index;
* G = ``--rlp-group-size`` thoughts per position, sampled as in training (temperature, budget,
  forced ``</think>``) with counter-based noise under a fixed key (``EVAL_KEY``): the same
  noise at every evaluation, so a change between evaluations is the model's, not the sampler's;
* logged (``rlp_eval/*``, joined to the iteration's metrics: Megatron's console line,
  TensorBoard/W&B, ``--rlp-metrics-file``):

  - ``info_gain``: mean S_pred − S_EMA (S_EMA from φ; in an NTP run, or before RLP's first step,
    φ is θ, as RLP's first step would start it);
  - ``reasoned_nll``: −S_pred, the NLL of x_t after the thought;
  - ``nothink_nll``: −log p_θ(x_t | context), θ's own NLL without a thought;
  - ``thought_len``, ``closed_frac``.

Distributed like the training step: position k goes to data-parallel rank k mod DP, each rank
generates its positions' thoughts on its TP/PP-sharded replica, and sums are all-reduced over DP
(equal across layouts, tested at TP = 1, TP = 2 and DP = 2). Nothing here changes θ, φ, the data
position or any RNG state.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import mpu

from rlp_megatron.data import build_sample, sample_positions
from rlp_megatron.logprobs import fp32_output_layer

EVAL_KEY = -1  # the sampling key's "iteration" for evaluations (training uses 0, 1, 2, …)
METRICS = ("info_gain", "reasoned_nll", "nothink_nll", "thought_len", "closed_frac")


def held_out_windows(dataset, k: int, seq_length: int) -> torch.Tensor:
    """[k, seq_length + 1] token windows of samples 0 … k−1 of ``dataset`` (Megatron's
    validation split; None on ranks that do not build it: zeros, filled by a broadcast)."""
    windows = torch.zeros((k, seq_length + 1), dtype=torch.long)
    if dataset is not None:
        if len(dataset) < k:
            raise SystemExit(f"rlp_megatron: --rlp-eval-positions {k}: the validation split has "
                             f"only {len(dataset)} samples")
        for i in range(k):
            s = dataset[i]
            windows[i] = torch.cat([torch.as_tensor(s["tokens"]),
                                    torch.as_tensor(s["labels"][-1:])]).long()
    return windows


@torch.no_grad()
def evaluate(step, model, dataset, k: int) -> dict[str, float] | None:
    """``rlp_eval/*`` of θ (and φ: ``step.teacher``, else θ) on the held-out positions; on the
    last pipeline stage (None elsewhere). ``step`` is the run's :class:`rlp_megatron.step.RLPStep`."""
    from rlp_megatron.step import _broadcast_from_loader_rank

    cfg, G = step.cfg, step.cfg.group_size
    windows = held_out_windows(dataset, k, step.seq_length).cuda()
    _broadcast_from_loader_rank(windows)
    windows = windows.cpu().numpy()
    dp = mpu.get_data_parallel_group()
    rank, size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    mine = [i for i in range(k) if i % size == rank]
    samples = {i: build_sample(windows[i], i, eod=step.eod, think=step.think,
                               prompt_prefix=step.prompt_prefix, min_context=cfg.min_context,
                               context_length=cfg.context_length, seed=cfg.seed,
                               position=sample_positions(
                                   windows[i], step.eod, cfg.min_context, cfg.context_length,
                                   cfg.seed, window_index=i)[0])
               for i in mine}
    order = sorted(mine, key=lambda i: (len(samples[i].context), i))  # similar widths
    sums = torch.zeros(6, dtype=torch.float64)  # info gain, S_pred, S_θ, length, closed, rows
    with (fp32_output_layer(model) if not step.fused else contextlib.nullcontext()):
        if order:
            work = [(samples[i], list(range(i * G, (i + 1) * G))) for i in order]
            r = step.generate(model, work, EVAL_KEY)
            s_theta, _ = step.score_contexts(model, [samples[i] for i in order], teacher=False)
            s_phi = s_theta
            if step.teacher is not None:
                s_phi, _ = step.score_contexts(model, [samples[i] for i in order], teacher=True)
            if s_theta is not None:  # last stage
                theta = dict(zip(order, s_theta.tolist()))
                phi = dict(zip(order, s_phi.tolist()))
                for g, s_pred, thought, closed in zip(r.groups, r.s_pred, r.thoughts, r.closed):
                    sums += torch.tensor([s_pred - phi[g], s_pred, theta[g], len(thought),
                                          float(closed), 1.0], dtype=torch.float64)
    if not mpu.is_pipeline_last_stage():
        return None
    sums = sums.cuda()
    dist.all_reduce(sums, group=dp)
    gain, s_pred, s_theta, length, closed, n = (sums / sums[5].clamp(min=1)).tolist()
    return {"rlp_eval/info_gain": gain, "rlp_eval/reasoned_nll": -s_pred,
            "rlp_eval/nothink_nll": -s_theta,
            "rlp_eval/thought_len": length, "rlp_eval/closed_frac": closed}
