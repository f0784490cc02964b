"""One RLP training step on the sharded model: positions → rollout → teacher → update → EMA.

The same step runs RPT (``--objective rpt``: the rollout also predicts the next tokens after
``</think>``, the reward is their exact match, no teacher) and the ablations of
``--rlp-positions`` (an entropy forward of the windows picks the positions) and
``--rlp-ntp-weight`` (the windows' other tokens join the update as NTP micro-batches).

Each phase is a method of :class:`RLPStep`, timed under its own name, and runs real Megatron-Core
code: rollouts through Megatron's static inference context (:mod:`rlp_megatron.rollout`), the
teacher forward through Megatron's pipeline schedule (forward only), the update through
Megatron's own ``train_step`` with :meth:`RLPStep.forward_step` / :meth:`RLPStep.loss_func` in
the usual ``(loss, num_tokens, report)`` contract. Every forward hands the last stage an
``output_processor`` request (:mod:`rlp_megatron.logprobs`) and gets log-probs back, not logits
(``--rlp-logprobs fused``, the default).

Choices (the paper leaves them open; rlp_spec §7):
* S_pred comes from the rollout (one decode step after the thought's ``</think>``), and
  ``old_logp`` (the ratio's denominator) is the update forward's own log-probs, detached: one
  optimizer step per rollout makes θ_old = θ, so ρ ≡ 1 and the clip is inactive, exactly as
  Alg. 1 intends, without a separate teacher-forced scoring forward over every row. No
  configuration here runs several updates per rollout, so there is no option for a separate
  old-log-prob forward. The update measures, at no extra cost, how far the decode-time values are
  from its teacher-forced ones: ``rlp/logprob_mismatch`` (thought tokens, behaviour log-probs) and
  ``rlp/s_pred_mismatch`` (S_pred).
* Thought tokens are scored at the sampling temperature T (the policy that sampled them);
  S_pred and S_EMA are log-likelihoods of x_t at T = 1.
* S_EMA is the teacher's log p̄_φ(x_t | context): no instruction prompt and no ``<think>``.
* Loss normalisation: the sum of per-thought losses over the global batch divided by the global
  number of thoughts (Alg. 1 l.14), independent of how rows fall into micro-batches and DP ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import mpu
from megatron.core.rerun_state_machine import RerunDataIterator

from rlp_megatron import faults, objective
from rlp_megatron import positions as positions_lib
from rlp_megatron.forward import (all_gather_rows, forward_only, micro_batches, processor,
                                  to_device)
from rlp_megatron.forward import variable_seq_lengths  # noqa: F401  (train.py's import)
from rlp_megatron.arguments import RLPConfig
from rlp_megatron.data import RLPSample, ThinkTokens, build_sample, layout_rows
from rlp_megatron.logprobs import LogprobRequest, VocabShard, token_logprobs, vocab_shard
from rlp_megatron.rollout import generate as rollout_lib
from rlp_megatron.rollout import placement
from rlp_megatron.teacher import EMATeacher


@dataclasses.dataclass
class StepData:
    """Everything one step computes about this rank's rows (index-aligned with ``rows``)."""

    samples: dict[int, RLPSample]  # group index → sample
    rollout: rollout_lib.Rollout  # this rank's rows (the update's)
    generated: rollout_lib.Rollout = None  # the groups this rank generated (and teacher-scores)
    teacher_groups: list[int] = dataclasses.field(default_factory=list)
    s_ema_generated: torch.Tensor = None  # [generated rows] (last stage)
    finite_rewards: bool = True  # every (valid) reward of the global batch is finite
    iteration: int = 0  # as logged (1-based)
    tokens: torch.Tensor = None  # [n, S] row layout (see rlp_megatron.data)
    labels: torch.Tensor = None
    thought_mask: torch.Tensor = None
    target_pos: torch.Tensor = None
    position_ids: torch.Tensor = None
    behaviour: torch.Tensor = None  # [n, S] decode-time log-probs at thought label positions
    old_logp: torch.Tensor = None  # [n, S] the update's log-probs (last stage, after the update)
    s_pred: torch.Tensor = None  # [n] from the rollout (last stage)
    s_ema: torch.Tensor = None  # [n] (the row's group value)
    advantages: torch.Tensor = None  # [n]
    rewards: torch.Tensor = None  # [n] (information gain, or RPT's match)
    metrics: dict = dataclasses.field(default_factory=dict)
    teacher_length: int = 0  # width of the teacher's rows (its longest context + 1)
    update_widths: list = dataclasses.field(default_factory=list)  # (rows, width) per micro-batch
    teacher_widths: list = dataclasses.field(default_factory=list)
    ntp_widths: list = dataclasses.field(default_factory=list)  # the NTP term's micro-batches

    @property
    def length(self) -> int:
        """Width of the update's rows: the longest row of this rank's step (the same on every
        pipeline stage, which track the same thoughts), not --seq-length."""
        return self.tokens.shape[1]


class RLPStep:
    def __init__(self, cfg: RLPConfig, think: ThinkTokens, prompt_prefix: list[int], eod: int,
                 seq_length: int, micro_batch_size: int, calculate_per_token_loss: bool,
                 vocab_size: int, check_nan: bool = True):
        self.cfg = cfg
        self.vocab_size = vocab_size  # the tokenizer's; Megatron's padded ids are never used
        self.think = think
        self.prompt_prefix = prompt_prefix
        self.eod = eod
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.calculate_per_token_loss = calculate_per_token_loss
        self.check_nan = check_nan
        self.teacher: EMATeacher | None = None
        self.owner: dict[int, int] | None = None  # the step's group owners, if computed early
        self.entropy_widths: list = []  # (rows, width) per micro-batch of the entropy forward
        self.window_targets: dict[int, list[int]] = {}  # window index → its K positions t
        self.ntp_fields: dict | None = None  # the NTP term's windows this step (rank's share)
        self._current: StepData | None = None
        self._loss_scale = 1.0
        self._vocab: VocabShard | None = None
        self._update_logp: list[torch.Tensor] = []
        self._mismatch_max: torch.Tensor | None = None
        self._iteration = 0  # of the update in flight (for the fault-injection hook)

    def vocab(self, model) -> VocabShard | None:
        """This rank's vocabulary shard (last pipeline stage; None elsewhere)."""
        if self._vocab is None:
            self._vocab = vocab_shard(model[0], mpu.get_tensor_model_parallel_rank(),
                                      self.vocab_size, mpu.get_tensor_model_parallel_group())
        return self._vocab

    @property
    def fused(self) -> bool:
        return self.cfg.logprobs == "fused"

    def request(self, **fields) -> LogprobRequest:
        return LogprobRequest(vocab=self._vocab, chunk_size=self.cfg.logprob_chunk_size, **fields)

    # -----------------------------------------------------------------------------------------
    # Phase 1: rows and positions

    def pull_samples(self, model, data_iterator, num_microbatches: int,
                     iteration: int) -> tuple[list, dict]:
        """Read this rank's rows for the step (as NTP would: num_microbatches × mbs samples) and
        share them over the model-parallel group; build one sample per group at the position
        :meth:`positions` chooses. ``iteration`` is the one the step produces (1-based)."""
        n = num_microbatches * self.micro_batch_size
        windows = torch.zeros((n, self.seq_length + 1), dtype=torch.long)
        indices = torch.zeros(n, dtype=torch.long)
        if data_iterator is not None:
            batches = [next(data_iterator) for _ in range(num_microbatches)]
            windows = torch.cat([b["window"] for b in batches]).long()
            indices = torch.cat([b["index"] for b in batches]).long()
        windows, indices = windows.cuda(), indices.cuda()  # NCCL broadcasts device tensors
        _broadcast_from_loader_rank(windows)
        _broadcast_from_loader_rank(indices)
        window_of, work = {}, {}
        for w, idx in zip(windows.cpu(), indices.tolist()):
            group = idx // self.cfg.group_size
            window_of.setdefault(group, w.numpy())
            work.setdefault(group, []).append(idx)
        chosen = self.positions(model, window_of, iteration)
        self.owner, self.entropy_widths = chosen.owner, chosen.entropy_widths
        self.window_targets = chosen.window_targets
        samples = {g: build_sample(window_of[g], g, eod=self.eod, think=self.think,
                                   prompt_prefix=self.prompt_prefix,
                                   min_context=self.cfg.min_context,
                                   context_length=self.cfg.context_length, seed=self.cfg.seed,
                                   position=chosen.by_group[g])
                   for g in work}
        return [(samples[g], rows) for g, rows in work.items()], samples

    def positions(self, model, window_of: dict, iteration: int) -> positions_lib.Chosen:
        """(t, context_start) of each group (:mod:`rlp_megatron.positions`)."""
        return positions_lib.choose(self, model, window_of, iteration)

    @property
    def needs_teacher(self) -> bool:
        return self.cfg.uses_teacher or self.cfg.entropy_model == "teacher"

    # -----------------------------------------------------------------------------------------
    # Phase 2: rollout

    def rollout(self, model, work, iteration: int, owner: dict | None = None
                ) -> tuple[rollout_lib.Rollout, rollout_lib.Rollout]:
        """Thoughts for the groups this rank owns (each group generated once over the DP ranks,
        :mod:`rlp_megatron.rollout.placement`), then for this rank's rows, in ``work`` order.
        Returns (generated, this rank's rows)."""
        dp_group = mpu.get_data_parallel_group()
        owned = placement.own_groups(work, self.cfg.group_size, dp_group, owner)
        generated = self.generate(model, owned, iteration,
                                  self.cfg.rpt_match_tokens if self.cfg.objective == "rpt" else 0)
        mine = placement.exchange(generated, [row for _, rows in work for row in rows], dp_group)
        # The update's rows shortest first, so that micro-batches hold rows of similar widths.
        prompt = {s.group: len(s.prompt) for s, _ in work}
        width = [prompt[g] + len(t) + (not c)
                 for g, t, c in zip(mine.groups, mine.thoughts, mine.closed)]
        order = sorted(range(len(width)), key=lambda i: width[i])
        return generated, mine.select([mine.rows[i] for i in order])

    def generate(self, model, work, iteration: int, predict_tokens: int = 0
                 ) -> rollout_lib.Rollout:
        """The thoughts of every (sample, rows) of ``work`` on this model replica."""
        chunk = model[0]
        cfg = rollout_lib.RolloutConfig(
            thought_length=self.cfg.thought_length, temperature=self.cfg.temperature,
            seed=self.cfg.seed, think=self.think,
            micro_batch_size=self.cfg.rollout_micro_batch_size, fused_logprobs=self.fused,
            predict_tokens=predict_tokens)
        pipeline = None
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            config = chunk.config if hasattr(chunk, "config") else chunk.module.config
            pipeline = rollout_lib.inference.Pipeline(config.hidden_size, config.params_dtype)
        return rollout_lib.generate(chunk, work, cfg, iteration, self.vocab(model),
                                    tp_group=mpu.get_tensor_model_parallel_group(),
                                    pipeline=pipeline)

    # -----------------------------------------------------------------------------------------
    # Phase 3: rows for the update, and the teacher (φ: S_EMA)

    def layout(self, data: StepData) -> None:
        r = data.rollout
        rows = layout_rows(
            prompts=[data.samples[g].prompt for g in r.groups], thoughts=r.thoughts,
            closed=r.closed, targets=[data.samples[g].target for g in r.groups],
            think_close=self.think.close, seq_length=self.seq_length, trim=True)
        data.tokens, data.labels = rows.tokens, rows.labels
        data.thought_mask, data.target_pos = rows.thought_mask, rows.target_pos
        data.position_ids = rows.position_ids
        data.behaviour = torch.zeros_like(data.thought_mask)
        for i, lp in enumerate(r.behaviour_logprobs):
            data.behaviour[i, data.thought_mask[i] > 0] = lp.float()
        data.s_pred = torch.tensor(r.s_pred, dtype=torch.float32)

    def score(self, model, data: StepData) -> None:
        """Teacher-forced θ forward over the rows: S_pred (T = 1) and thought log-probs (T) into
        ``data.s_pred`` / ``data.old_logp``. Not part of the step (S_pred comes from the rollout,
        the old log-probs from the update): a check of the rollout's values, for diagnostics."""
        out = forward_only(model, micro_batches(
            dict(tokens=data.tokens, position_ids=data.position_ids, labels=data.labels,
                 target_pos=data.target_pos), self.micro_batch_size),
            partial(_score_forward_step, temperature=self.cfg.temperature,
                    vocab=self.vocab(model), step=self), data.length,
            self.micro_batch_size)
        if out is not None:
            data.old_logp = torch.cat([o["logp"] for o in out]).cpu() * data.thought_mask
            data.s_pred = torch.cat([o["s_target"] for o in out]).cpu()

    def score_teacher(self, model, data: StepData) -> None:
        """S_EMA = log p̄_φ(x_t | context) once per group this rank generated, with φ swapped
        into the model, into ``data.s_ema_generated`` (per generated row)."""
        groups = sorted(set(data.generated.groups),
                        key=lambda g: (len(data.samples[g].context), g))  # similar widths
        data.teacher_groups = groups
        if not self.cfg.uses_teacher:  # RPT: no S_EMA (logged as 0)
            data.teacher_groups = []
            data.s_ema_generated = torch.zeros(len(data.generated.groups))
            return
        if not groups:  # every stage of this DP replica owns nothing this step
            data.s_ema_generated = torch.zeros(0)
            return
        scores, data.teacher_widths = self.score_contexts(model, [data.samples[g] for g in groups],
                                                          teacher=True)
        data.teacher_length = max(w for _, w in data.teacher_widths)
        if scores is not None:
            by_group = dict(zip(groups, scores.tolist()))
            data.s_ema_generated = torch.tensor([by_group[g] for g in data.generated.groups])

    def score_contexts(self, model, samples: list[RLPSample], teacher: bool
                       ) -> tuple[torch.Tensor | None, list]:
        """log p(x_t | context) at T = 1 of each sample, without prompt or thought — of φ
        (``teacher``, swapped into the model) or of θ; last pipeline stage, else None; and the
        (rows, width) of each micro-batch. ``samples`` sorted by context length keep the
        micro-batches' padding small."""
        contexts = [s.context for s in samples]
        rows = layout_rows(prompts=contexts, thoughts=[[] for _ in samples],
                           closed=[True] * len(samples), targets=[s.target for s in samples],
                           think_close=self.think.close, seq_length=self.seq_length, trim=True)
        mbs = self.micro_batch_size
        batch = dict(tokens=rows.tokens, position_ids=rows.position_ids, labels=rows.labels,
                     target_pos=rows.target_pos)
        # Contexts of similar widths together, at most mbs each, each bucket at its own width.
        batches = micro_batches(batch, mbs, trim=True,
                                sizes=_length_buckets([len(c) for c in contexts], mbs))
        widths = [(len(b["tokens"]), b["tokens"].shape[1]) for b in batches]
        swap = self.teacher.swapped_in() if teacher else contextlib.nullcontext()
        with swap:
            out = forward_only(model, batches,
                               partial(_score_forward_step, temperature=1.0, need_logp=False,
                                       vocab=self.vocab(model), step=self),
                               rows.tokens.shape[1], mbs)
        if out is None:
            return None, widths
        return torch.cat([o["s_target"] for o in out]).cpu()[: len(samples)], widths

    # -----------------------------------------------------------------------------------------
    # Phase 4: rewards and group-relative advantages (last pipeline stage)

    def advantages(self, data: StepData) -> None:
        """Rewards and advantages of every global row, from the rows each DP rank generated
        (each exactly once); ``data.s_ema`` and ``data.advantages`` for this rank's rows."""
        r = data.generated
        dp = mpu.get_data_parallel_group()
        rows = torch.tensor(r.rows, dtype=torch.long)
        closed = torch.tensor(r.closed, dtype=torch.bool)
        lengths = torch.tensor([len(t) for t in r.thoughts], dtype=torch.float64)
        local = torch.stack([rows.double(), torch.tensor(r.s_pred, dtype=torch.float64),
                             data.s_ema_generated.double(), closed.double(), lengths,
                             torch.tensor(r.groups, dtype=torch.float64),
                             self._rpt_rewards(data).double()], dim=1)
        local = local.reshape(-1, 7)  # no generated rows: [0, 7]
        world = all_gather_rows(local.cuda(), dp).cpu()  # [global rows, 7]
        world = world[torch.argsort(world[:, 0])]
        G = self.cfg.group_size
        _check_whole_groups(world[:, 5].long(), G)
        s_pred, s_ema = world[:, 1].view(-1, G), world[:, 2].view(-1, G)
        if self.cfg.objective == "rpt":
            reward = world[:, 6].view(-1, G)
        else:
            reward = objective.information_gain(s_pred, s_ema[:, :1])
        valid = world[:, 3].view(-1, G).bool() if self.cfg.unclosed == "zero" else None
        if faults.nan_reward_at(data.iteration):
            reward[0, 0] = float("nan")  # fault injection (tests/test_faults.py)
        finite = torch.isfinite(reward) | (~valid if valid is not None else False)
        data.finite_rewards = bool(finite.all())
        adv = objective.group_advantages(reward, valid=valid).reshape(-1)
        position = {int(i): k for k, i in enumerate(world[:, 0].tolist())}
        mine = [position[i] for i in data.rollout.rows]
        data.advantages = adv[mine].float()
        data.rewards = reward.reshape(-1)[mine].float()
        data.s_ema = world[mine, 2].float()
        data.metrics.update({"rlp/reward": reward.mean().item()} if self.cfg.objective == "rpt"
                            else {"rlp/info_gain": reward.mean().item(),
                                  "rlp/s_ema": s_ema.mean().item()})
        data.metrics.update({
            "rlp/s_pred": s_pred.mean().item(),
            "rlp/thought_len": world[:, 4].mean().item(),
            "rlp/closed_frac": world[:, 3].mean().item(),
            "rlp/advantage_abs": adv.abs().mean().item(),
        })
        self._num_thoughts_global = int((world[:, 4] > 0).sum().item())

    def _rpt_rewards(self, data: StepData) -> torch.Tensor:
        """RPT's reward of each generated row (:func:`objective.prefix_match_reward`); zeros
        for RLP."""
        r = data.generated
        if self.cfg.objective != "rpt" or not r.rows:
            return torch.zeros(len(r.rows))
        n = self.cfg.rpt_match_tokens
        truth = torch.full((len(r.rows), n), -1, dtype=torch.long)
        for i, g in enumerate(r.groups):
            known = data.samples[g].continuation[:n]
            truth[i, : len(known)] = torch.tensor(known)
        return objective.prefix_match_reward(torch.tensor(r.predicted), truth)

    # -----------------------------------------------------------------------------------------
    # Phase 5: the update, through Megatron's train_step

    def update_batches(self, data: StepData, num_microbatches: int) -> RerunDataIterator:
        """The update's micro-batches: this rank's thought rows, then (``--rlp-ntp-weight`` > 0)
        the NTP term's windows. Sets ``self.num_microbatches`` to their count, which the
        update's schedule must run (train.py passes it to Megatron's forward_backward_func)."""
        n = len(data.rollout.rows)
        self._iteration = data.iteration
        fields = dict(tokens=data.tokens, position_ids=data.position_ids, labels=data.labels,
                      thought_mask=data.thought_mask, target_pos=data.target_pos)
        if data.advantages is not None:  # last stage
            fields.update(advantages=data.advantages, behaviour=data.behaviour,
                          s_pred=data.s_pred)
        self._update_logp = []
        self._mismatch_max = None
        batches = micro_batches(fields, self.micro_batch_size, trim=True)
        data.update_widths = [(len(b["tokens"]), b["tokens"].shape[1]) for b in batches]
        ntp = self.ntp_batches(data)
        data.ntp_widths = [(len(b["tokens"]), b["tokens"].shape[1]) for b in ntp]
        self.num_microbatches = len(batches) + len(ntp)
        dp_size = mpu.get_data_parallel_world_size()
        # Per-thought loss sums are scaled so that Megatron's per-micro-batch averaging and DP
        # gradient averaging add up to (1 / global thoughts) Σ loss (see loss_func); the NTP
        # term's to λ / (global NTP tokens) Σ CE.
        thoughts = max(1, getattr(self, "_num_thoughts_global", n))
        self._loss_scale = self.num_microbatches * dp_size / thoughts
        if self.calculate_per_token_loss:  # Megatron divides by the thoughts counted
            self._ntp_scale = self.cfg.ntp_weight * thoughts / max(1, self._ntp_tokens_global)
        else:
            self._ntp_scale = (self.cfg.ntp_weight * self.num_microbatches * dp_size
                               / max(1, self._ntp_tokens_global))
        return RerunDataIterator(iter(batches + ntp))

    def ntp_batches(self, data: StepData) -> list[dict]:
        """``--rlp-ntp-weight``: the windows of this step whose first group this rank generated
        (each window once over the DP ranks), as Megatron's NTP micro-batches with the loss
        mask off at the window's selected positions (their tokens are RLP's)."""
        self.ntp_fields, self._ntp_tokens_global = None, 0
        if self.cfg.ntp_weight <= 0:
            return []
        K = self.cfg.positions_per_doc
        firsts = sorted(g for g in set(data.generated.groups) if g % K == 0)
        S = self.seq_length
        tokens = torch.zeros((len(firsts), S), dtype=torch.long)
        labels = torch.zeros_like(tokens)
        loss_mask = torch.ones((len(firsts), S), dtype=torch.float)
        for i, g in enumerate(firsts):
            w = torch.as_tensor(data.samples[g].window).long()
            tokens[i], labels[i] = w[:-1], w[1:]
            for t in self.window_targets[g // K]:
                loss_mask[i, t - 1] = 0.0  # label t − 1 is x_t
        count = torch.tensor([loss_mask.sum()], dtype=torch.float64).cuda()
        dist.all_reduce(count, group=mpu.get_data_parallel_group())
        self._ntp_tokens_global = int(count.item())
        self.ntp_fields = dict(tokens=tokens, labels=labels, loss_mask=loss_mask,
                               position_ids=torch.arange(S)[None].expand(len(firsts), S)
                               .contiguous())
        return micro_batches(self.ntp_fields, self.micro_batch_size) if len(firsts) else []

    def forward_step(self, data_iterator, model, return_schedule_plan: bool = False):
        mb = to_device(next(data_iterator))
        if "loss_mask" in mb:  # the NTP term's window: Megatron's own loss path
            output = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"],
                           loss_mask=mb["loss_mask"])
            return output, partial(self.ntp_loss_func, mb)
        if self.fused:  # the model returns the labels' log-probs at T and S_pred (last stage)
            output = model(mb["tokens"], mb["position_ids"], None,
                           **processor(self.request(labels=mb["labels"],
                                                     target_pos=mb["target_pos"],
                                                     temperature=self.cfg.temperature)))
        else:
            output = model(mb["tokens"], mb["position_ids"], None)
        return output, partial(self.loss_func, mb)

    def loss_func(self, mb, output_tensor):
        if self.fused:
            logp, s_pred_tf = output_tensor[:, :-1], output_tensor[:, -1]
        else:
            logp = token_logprobs(output_tensor, mb["labels"], self.cfg.temperature, self._vocab)
            with torch.no_grad():
                s_pred_tf = token_logprobs(_at_target(output_tensor, mb), _target_labels(mb),
                                           vocab=self._vocab)
        # On-policy: θ_old = θ, so the old log-probs are these, detached (ρ ≡ 1).
        old_logp = logp.detach()
        self._update_logp.append(old_logp)
        mask = mb["thought_mask"] > 0
        mismatch = (old_logp - mb["behaviour"]).abs().masked_fill(~mask, 0.0)
        s_pred_mismatch = (s_pred_tf.detach() - mb["s_pred"]).abs()
        worst = torch.stack([mismatch.max(), s_pred_mismatch.max()])
        self._mismatch_max = worst if self._mismatch_max is None else torch.maximum(
            self._mismatch_max, worst)
        per_thought, has_tokens, sums = objective.per_thought_surrogate(
            logp, old_logp, mb["advantages"], mb["thought_mask"],
            self.cfg.clip_eps_low, self.cfg.clip_eps_high)
        loss_sum = (per_thought * has_tokens).sum()
        count = has_tokens.sum()
        if len(self._update_logp) == 1:
            faults.at("update", self._iteration)
        if faults.nan_loss_at(self._iteration):
            loss_sum = loss_sum * float("nan")  # fault injection (tests/test_faults.py)
        if self.check_nan:
            _validate_finite(loss_sum)
        report = {
            "rlp/loss": torch.stack([loss_sum.detach().float(), count.float()]),
            "rlp/clip_frac": torch.stack([
                (sums["num_clipped_high"] + sums["num_clipped_low"]).float(),
                sums["num_tokens"].float()]),
            "rlp/ratio": torch.stack([sums["ratio_sum"].float(), sums["num_tokens"].float()]),
            "rlp/logprob_mismatch": torch.stack([mismatch.sum().float(), mask.sum().float()]),
            "rlp/s_pred_mismatch": torch.stack([s_pred_mismatch.sum().float(),
                                                torch.tensor(float(s_pred_mismatch.numel()),
                                                             device=s_pred_mismatch.device)]),
        }
        if self.cfg.ntp_weight > 0:
            report["rlp/ntp_loss"] = torch.zeros(2, device=loss_sum.device)
        if self.calculate_per_token_loss:
            return loss_sum, count.to(torch.int), report
        return loss_sum * self._loss_scale, torch.ones((), dtype=torch.int).cuda(), report

    def ntp_loss_func(self, mb, output_tensor):
        """λ × Megatron's NTP loss (summed per token, normalised over the step's NTP tokens);
        reports the same keys as :meth:`loss_func` (zero counts) plus ``rlp/ntp_loss``."""
        mask = mb["loss_mask"].float()
        ce_sum = (output_tensor.float() * mask).sum()
        if self.check_nan:
            _validate_finite(ce_sum)
        zero = torch.zeros(2, device=ce_sum.device)
        report = {key: zero for key in ("rlp/loss", "rlp/clip_frac", "rlp/ratio",
                                        "rlp/logprob_mismatch", "rlp/s_pred_mismatch")}
        report["rlp/ntp_loss"] = torch.stack([ce_sum.detach(), mask.sum()])
        if self.calculate_per_token_loss:
            return ce_sum * self._ntp_scale, torch.zeros((), dtype=torch.int).cuda(), report
        return ce_sum * self._ntp_scale, torch.ones((), dtype=torch.int).cuda(), report


    def finish_update(self, data: StepData) -> None:
        """After the update (last stage): the update's log-probs as ``data.old_logp`` and the
        largest decode/update differences over the data-parallel ranks."""
        if not self._update_logp:
            return
        data.old_logp = torch.cat([F.pad(lp, (0, data.length - lp.shape[1]))
                                   for lp in self._update_logp]).cpu()
        worst = self._mismatch_max.double().clone()
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=mpu.get_data_parallel_group())
        data.metrics["rlp/logprob_mismatch_max"] = worst[0].item()
        data.metrics["rlp/s_pred_mismatch_max"] = worst[1].item()


# ---------------------------------------------------------------------------------------------
# helpers


def _length_buckets(widths: list[int], max_rows: int, slack: float = 1 / 16) -> list[int]:
    """Sizes of consecutive buckets of ``widths`` (sorted ascending), each at most ``max_rows``
    rows, closed early when padding to the bucket's widest row would exceed ``slack`` of its
    tokens: a forward over a bucket computes at most (1 + slack) × its useful positions."""
    sizes, n, total = [], 0, 0
    for w in widths:
        if n and (n == max_rows or (n + 1) * w > (1 + slack) * (total + w)):
            sizes.append(n)
            n, total = 0, 0
        n, total = n + 1, total + w
    return sizes + [n] if n else sizes


def _score_forward_step(data_iterator, model, temperature, vocab, step: RLPStep,
                        need_logp=True):
    """S at T = 1 of each row's target (and the labels' log-probs at T): fused, the model returns
    them (see LogprobRequest); else they are computed from its logits."""
    mb = to_device(next(data_iterator))
    if step.fused:
        request = step.request(labels=mb["labels"] if need_logp else None,
                               target_pos=mb["target_pos"], temperature=temperature,
                               targets=None if need_logp else _target_labels(mb))
        output = model(mb["tokens"], mb["position_ids"], None, **processor(request))

        def split(output_tensor, non_loss_data=False):
            if not need_logp:
                return {"s_target": output_tensor.float()}
            return {"s_target": output_tensor[:, -1].float(), "logp": output_tensor[:, :-1]}

        return output, split
    output = model(mb["tokens"], mb["position_ids"], None)

    def collect(output_tensor, non_loss_data=False):
        rows = torch.arange(output_tensor.shape[0], device=output_tensor.device)
        target_logits = output_tensor[rows, mb["target_pos"]]
        s_target = token_logprobs(target_logits, mb["labels"][rows, mb["target_pos"]],
                                  vocab=vocab)
        result = {"s_target": s_target.float()}
        if need_logp:
            result["logp"] = token_logprobs(output_tensor, mb["labels"], temperature,
                                            vocab).float()
        return result

    return output, collect


def _at_target(logits: torch.Tensor, mb: dict) -> torch.Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, mb["target_pos"]]


def _target_labels(mb: dict) -> torch.Tensor:
    rows = torch.arange(mb["labels"].shape[0], device=mb["labels"].device)
    return mb["labels"][rows, mb["target_pos"]]


def _loader_src(group) -> int:
    """Group rank of the first-stage TP-rank-0 process (it holds the data iterator)."""
    flag = torch.tensor([1 if (mpu.get_tensor_model_parallel_rank() == 0
                               and mpu.is_pipeline_first_stage()) else 0]).cuda()
    flags = [torch.zeros_like(flag) for _ in range(dist.get_world_size(group))]
    dist.all_gather(flags, flag, group=group)
    return int(torch.cat(flags).argmax().item())


def _broadcast_from_loader_rank(tensor: torch.Tensor) -> None:
    group = mpu.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    dist.broadcast(tensor, group=group, group_src=_loader_src(group))


def _check_whole_groups(groups: torch.Tensor, G: int) -> None:
    """The step's rows, sorted by row index, must be whole groups of G rows of one context each
    (train.align_consumed_samples and the startup checks make it so); anything else would mix
    contexts in a baseline, so it is an error, never a silent average."""
    n = groups.numel()
    ok = n % G == 0
    if ok:
        blocks = groups.view(-1, G)
        ok = bool((blocks == blocks[:, :1]).all()) and blocks[:, 0].unique().numel() == n // G
    if not ok:
        counts = {int(g): int(c) for g, c in zip(*groups.unique(return_counts=True))}
        raise RuntimeError(f"rlp_megatron: this step's {n} rows are not whole groups of "
                           f"--rlp-group-size {G} (rows per group: {counts})")


def _validate_finite(loss):
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    rsm = get_rerun_state_machine()
    rsm.validate_result(result=loss, rejection_func=torch.isnan,
                        message="found NaN in local RLP loss", tolerance=0.0, fatal=True)
    rsm.validate_result(result=loss, rejection_func=torch.isinf,
                        message="found Inf in local RLP loss", tolerance=0.0, fatal=True)

