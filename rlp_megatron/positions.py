"""The positions phase of an RLP step: which (t, context) each group trains on.

``--rlp-positions uniform`` (the paper's) is a pure function of the window
(:func:`rlp_megatron.data.sample_positions`): every rank draws it for the groups it holds, with
no communication. ``entropy`` and ``curriculum`` need the next-token entropies of the window
(:class:`rlp_megatron.data.PositionConfig`), so:

* each window is scored once over the data-parallel ranks: by the owner
  (:func:`rlp_megatron.rollout.placement.owners`, the rank that will generate the group) of the
  window's first group in the step — whole windows, since the global batch is a multiple of K·G;
* one teacher-forced forward of θ (or φ, ``--rlp-entropy-model teacher``) over its windows
  through Megatron's schedule, forward only; the last stage gets the entropies from the fused
  kernel's entropy output (no logits; ``--rlp-logprobs logits``: from Megatron's output layer);
* the last stage draws the window's K positions and they travel as integers: to the other
  pipeline stages (broadcast) and to the other data-parallel ranks (all-gather), so every rank
  builds the same samples.

Its cost (one forward of ``seq_length`` tokens per window, the output projection at every
position) is counted in the step's FLOPs (``entropy_widths``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import mpu

from rlp_megatron.data import eligible_positions, entropy_candidates, sample_positions
from rlp_megatron.forward import all_gather_rows, forward_only, micro_batches, processor, to_device
from rlp_megatron.logprobs import token_logprobs
from rlp_megatron.rollout import placement


@dataclasses.dataclass
class Chosen:
    """The step's positions."""

    by_group: dict[int, tuple[int, int]]  # group → (t, context_start), the groups of this rank
    window_targets: dict[int, list[int]]  # window index → its K positions t
    owner: dict[int, int] | None = None  # the step's group owners (when computed here)
    entropy_widths: list = dataclasses.field(default_factory=list)  # (rows, width) per batch


def choose(step, model, window_of: dict, iteration: int) -> Chosen:
    """(t, context_start) of each group of ``window_of`` (group → its window) for the step that
    produces ``iteration``; ``step`` is the :class:`rlp_megatron.step.RLPStep`."""
    cfg = step.cfg
    K, pc = cfg.positions_per_doc, cfg.position_config
    draw = partial(sample_positions, eod=step.eod, min_context=cfg.min_context,
                   context_length=cfg.context_length, seed=cfg.seed, k=K)
    if not pc.needs_entropy:
        cache = {}
        for g, w in window_of.items():
            if g // K not in cache:
                cache[g // K] = draw(w, window_index=g // K)
        return Chosen(by_group={g: cache[g // K][g % K] for g in window_of},
                      window_targets={b: [t for t, _ in p] for b, p in cache.items()})
    dp = mpu.get_data_parallel_group()
    owner = placement.owners(list(window_of), cfg.group_size, dp)
    first = {}
    for g in sorted(owner):
        first.setdefault(g // K, g)
    me = dist.get_rank(dp) if dist.get_world_size(dp) > 1 else 0
    mine = sorted(b for b, g in first.items() if owner[g] == me)
    entropy, widths = None, []
    if mine:
        entropy, widths = window_entropy(step, model, [window_of[first[b]] for b in mine])
    picks = torch.zeros((len(mine) * K, 4), dtype=torch.long)  # window, j, t, context_start
    if entropy is not None:  # last stage
        for i, b in enumerate(mine):
            w = window_of[first[b]]
            valid, _ = eligible_positions(w, step.eod, cfg.min_context)
            h = np.full(len(w), np.nan)
            h[1:] = entropy[i, : len(w) - 1].double().numpy()  # h[t]: the entropy predicting w[t]
            candidates = entropy_candidates(valid, h, pc, iteration, K)
            for j, (t, start) in enumerate(draw(w, window_index=b, candidates=candidates)):
                picks[i * K + j] = torch.tensor([b, j, t, start])
    picks = picks.cuda()
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        pp = mpu.get_pipeline_model_parallel_group()
        dist.broadcast(picks, group=pp, group_src=dist.get_world_size(pp) - 1)
    chosen = {b * K + j: (t, start)
              for b, j, t, start in all_gather_rows(picks, dp).cpu().tolist()}
    return Chosen(by_group={g: chosen[g] for g in window_of},
                  window_targets={g // K: [chosen[(g // K) * K + j][0] for j in range(K)]
                                  for g in window_of},
                  owner=owner, entropy_widths=widths)


def window_entropy(step, model, windows: list) -> tuple[torch.Tensor | None, list]:
    """([n, seq_length] next-token entropies in nats at T = 1 — entry j is the entropy of the
    distribution that predicts ``window[j + 1]`` — on the last pipeline stage, else None;
    (rows, width) of each micro-batch)."""
    w = torch.as_tensor(np.stack(windows)).long()
    S = w.shape[1] - 1
    fields = dict(tokens=w[:, :-1].contiguous(), labels=w[:, 1:].contiguous(),
                  position_ids=torch.arange(S)[None].expand(len(w), S).contiguous())
    batches = micro_batches(fields, step.micro_batch_size)
    swap = (step.teacher.swapped_in() if step.cfg.entropy_model == "teacher"
            else contextlib.nullcontext())
    with swap:
        out = forward_only(model, batches, partial(_entropy_forward_step,
                                                   vocab=step.vocab(model), step=step),
                           S, step.micro_batch_size)
    entropy = torch.cat([o["entropy"] for o in out]).cpu() if out is not None else None
    return entropy, [(len(b["tokens"]), S) for b in batches]


def _entropy_forward_step(data_iterator, model, vocab, step):
    mb = to_device(next(data_iterator))
    if step.fused:
        output = model(mb["tokens"], mb["position_ids"], None,
                       **processor(step.request(labels=mb["labels"], entropy=True)))
        return output, lambda out, non_loss_data=False: {"entropy": out[..., 1].float()}
    output = model(mb["tokens"], mb["position_ids"], None)

    def collect(output_tensor, non_loss_data=False):
        _, entropy = token_logprobs(output_tensor, mb["labels"], 1.0, vocab, entropy=True)
        return {"entropy": entropy.float()}

    return output, collect
