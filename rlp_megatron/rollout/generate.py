"""Generate G thoughts per context on the training model (TP-sharded, same process, no copy).

Per rollout batch (whole groups, sorted by prompt length; one KV cache / Mamba state set, every
row at the same position — Megatron's static batching, which keeps attention and the Mamba
recurrence exact without masks):

1. prefill: one forward over the distinct prompts' first ``L_min`` tokens (``L_min`` = the batch's
   shortest prompt), once per context, in a cache sized for exactly those prompts;
2. decode, one position per step. The cache holds two kinds of rows: a *context slot* per
   context still inside its prompt, fed its next prompt token (so a prompt is run once per
   context, not once per thought), and a *row slot* per thought. When a context's prompt ends,
   its slot is expanded into one row slot per thought of its group (the KV cache and the Mamba
   conv/SSM states indexed G-fold into new dense buffers, :func:`inference.reindex_context`).
   A row slot samples its next thought token (Gumbel-max over the vocab shards,
   :mod:`.sampling`) and stops at a sampled ``</think>`` or after ``thought_length`` tokens;
3. S_pred: a thought's last token is fed as usual (plus a forced ``</think>`` when it hit the
   budget), and the logits of that forward give S_pred = log p_θ(x_t | prompt, thought,
   ``</think>``) at T = 1 — one more decode step instead of a teacher-forced scoring forward over
   every row (decode ≡ teacher forcing is tested; the update logs the difference as
   ``rlp/s_pred_mismatch``);
4. compaction: a scored row is dropped from the cache at the next expansion, or once
   ``COMPACT_FRACTION`` of the rows are scored (a copy of the live cache, about as much memory
   traffic as one attention read of it; eager compaction would copy after every finish, lazy
   compaction wastes at most that fraction of a step's rows).

So the tokens run through the model are exactly the useful ones — each prompt once, each thought
and its forced ``</think>`` once per row — up to the rows waiting for compaction
(``tests/test_rollout.py`` checks the count exactly). Measured with ``benchmarks/rlp_step.py`` on
CPU (4 contexts of 32–64 tokens × G = 4, thoughts of 64, 10 steps): executed / useful positions
1.165 → 1.000 (the old loop fed prompt tails G-fold and kept finished rows); decode time per
step from position 64 to 1024: 1.45× → 1.13× (rotated-key cache). A
step does one host sync (the count of scored rows); expansions and compactions are decided from
host-side lengths and that count, identically on every pipeline stage.

With pipeline parallelism each step runs stage by stage (hidden states sent forward), the last
stage samples, and only the sampled token ids (one int64 per row) go back to the other stages —
not Megatron's broadcast of full logits. Every stage tracks the same per-row state from those ids,
so all stages agree on expansions, compactions and when the batch is done, and hold the thoughts
for the update.

**Megatron's ``DynamicInferenceEngine``** (paged KV cache, continuous batching, chunked prefill,
CUDA graphs; what Megatron-RL uses) was evaluated and not adopted, for now:
- it does not run here: its attention asserts flash-attn ≥ 2.7.3 (or FA3/FA4), so neither CPU CI
  nor a GPU without flash-attn can execute it, and none of our guarantees could be tested;
- its sampling draws from a ``torch.Generator`` per rank (``sampling_rng``), so thoughts would
  differ across TP/DP layouts and resumes (ours are counter-based: the same thought for the same
  global row anywhere) — we would have to replace its sampler;
- with PP it broadcasts the last stage's logits; we exchange token ids only;
- requests are independent prompts: G-fold sharing of one prefill goes through its prefix cache
  (KV blocks, plus a separately sized Mamba state cache, ``prefix_caching_mamba_gb``), matched
  at block granularity, where we index one prefilled row G-fold exactly.
What we took from it: rotated keys in the cache (one rotation per new key,
:mod:`rlp_megatron.megatron_fixes` fix 9), one prefill per distinct prompt, no compute for
finished requests (compaction instead of paging), and one host sync per step. What it still has
that we do not: refilling freed rows with new groups mid-batch (continuous batching) and CUDA
graphs of the decode step; with one rollout batch per step and groups of 16 thoughts, compaction
recovers the finished rows' compute, and a refill would only pay off with several batches per
rank per step.

Behaviour log-probs log softmax(l/T)[c_u] are recorded per token at the sampling temperature: the
policy π_θ whose ratio the update takes is the temperature-T distribution that produced c.
"""

from __future__ import annotations

import dataclasses

import torch

from rlp_megatron import faults
from rlp_megatron.data import RLPSample, ThinkTokens
from rlp_megatron.logprobs import LogprobRequest, VocabShard
from rlp_megatron.rollout import inference
from rlp_megatron.rollout import sampling as sampling_lib


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    thought_length: int
    temperature: float
    seed: int
    think: ThinkTokens
    micro_batch_size: int = 0  # rows per rollout batch; 0 = all rows of the rank at once
    pad_id: int = 0
    fused_logprobs: bool = True  # last-position logits from the hidden states (no output layer)
    predict_tokens: int = 0  # RPT: tokens sampled after </think> (0: RLP, S_pred only)


@dataclasses.dataclass
class Rollout:
    """Thoughts for this rank's rows, in the order of ``rows``."""

    rows: list[int]  # global row index of each thought
    groups: list[int]  # global group index of each thought
    thoughts: list[list[int]]  # sampled tokens, including a sampled </think>
    closed: list[bool]  # ended with a sampled </think>
    behaviour_logprobs: list[torch.Tensor]  # one per thought, len == len(thought)
    s_pred: list[float] = dataclasses.field(default_factory=list)  # last pipeline stage only
    predicted: list[list[int]] = dataclasses.field(default_factory=list)  # RPT, last stage
    fed_tokens: int = 0  # tokens run through the model: prefills + rows × decode steps
    logit_rows: int = 0  # positions whose logits were computed (fused: the last of each forward)
    decode_steps: int = 0  # one-token forwards (each feeds every row in the cache)


    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.thoughts)

    def select(self, rows: list[int]) -> "Rollout":
        """The thoughts of ``rows``, in that order (the work counters are not carried over)."""
        index = {row: i for i, row in enumerate(self.rows)}
        idx = [index[row] for row in rows]
        pick = lambda values: [values[i] for i in idx]  # noqa: E731
        return Rollout(rows=list(rows), groups=pick(self.groups), thoughts=pick(self.thoughts),
                       closed=pick(self.closed),
                       behaviour_logprobs=pick(self.behaviour_logprobs),
                       s_pred=pick(self.s_pred))


def _batches(work: list[tuple[RLPSample, list[int]]], max_rows: int):
    """Whole groups, shortest prompts first, at most ``max_rows`` rows per batch (a group larger
    than the bound is split across batches)."""
    items = sorted(work, key=lambda w: len(w[0].prompt))
    batch, n = [], 0
    for sample, rows in items:
        while rows:
            room = (max_rows - n) if max_rows > 0 else len(rows)
            if room == 0:
                yield batch
                batch, n = [], 0
                continue
            take, rows = rows[:room], rows[room:]
            batch.append((sample, take))
            n += len(take)
    if batch:
        yield batch


def generate(model, work: list[tuple[RLPSample, list[int]]], cfg: RolloutConfig, iteration: int,
             vocab: VocabShard | None, tp_group=None,
             pipeline: inference.Pipeline | None = None) -> Rollout:
    """Thoughts for every (group sample, global rows) pair in ``work``; ``vocab`` is this rank's
    vocabulary shard on the last pipeline stage (None elsewhere)."""
    out = Rollout(rows=[], groups=[], thoughts=[], closed=[], behaviour_logprobs=[])
    if pipeline is not None and pipeline.size == 1:
        pipeline = None
    with inference.inference_mode(model):
        for batch in _batches(work, cfg.micro_batch_size):
            _generate_batch(model, batch, cfg, iteration, vocab, tp_group, pipeline, out)
    return out


# A batch is compacted (finished rows dropped from the KV cache and the Mamba states) once this
# fraction of its rows is finished, or at any expansion; see the module docstring.
COMPACT_FRACTION = 1 / 16


@dataclasses.dataclass
class _Slots:
    """Per-row decode state of the rows in the cache, in cache order: row slots (one thought each)
    first, then one context slot per context still inside its prompt (``row`` = −1)."""

    sample: torch.Tensor  # index of the row's context in the batch
    row: torch.Tensor  # global row index; −1 for a context slot
    key: torch.Tensor  # the row's sampling key (seed, iteration, row), computed once
    thought: torch.Tensor  # [n, thought_length] sampled tokens
    logps: torch.Tensor  # [n, thought_length] behaviour log-probs
    n_tok: torch.Tensor  # tokens sampled so far
    closed: torch.Tensor  # sampled </think>
    done: torch.Tensor  # thought complete (closed or at the budget)
    need_close: torch.Tensor  # feed a forced </think> next
    score_now: torch.Tensor  # the current logits predict x_t
    scored: torch.Tensor  # S_pred recorded: the row costs nothing from here on
    s_pred: torch.Tensor
    pred_k: torch.Tensor  # RPT: prediction tokens sampled so far
    predicted: torch.Tensor  # [n, max(1, predict_tokens)] RPT's predictions

    @classmethod
    def contexts(cls, n: int, thought_length: int, device, predict: int = 1) -> "_Slots":
        def zeros(*shape, dtype=torch.bool):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(sample=torch.arange(n, device=device),
                   row=torch.full((n,), -1, dtype=torch.long, device=device),
                   key=zeros(n, dtype=torch.long),
                   thought=zeros(n, thought_length, dtype=torch.long),
                   logps=zeros(n, thought_length, dtype=torch.float32),
                   n_tok=zeros(n, dtype=torch.long), closed=zeros(n), done=zeros(n),
                   need_close=zeros(n), score_now=zeros(n), scored=zeros(n),
                   s_pred=zeros(n, dtype=torch.float32), pred_k=zeros(n, dtype=torch.long),
                   predicted=zeros(n, predict, dtype=torch.long))

    def select(self, index: torch.Tensor) -> "_Slots":
        return _Slots(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def __len__(self) -> int:
        return len(self.row)


def _generate_batch(model, batch, cfg: RolloutConfig, iteration, vocab: VocabShard | None,
                    tp_group, pipeline, out):
    dev = torch.cuda.current_device()  # Megatron's device (the CPU backend maps it to CPU)
    batch = sorted(batch, key=lambda item: len(item[0].prompt))  # expansions in context order
    samples = [s for s, _ in batch]
    lengths = [len(s.prompt) for s in samples]
    n_ctx, l_min, l_max = len(samples), lengths[0], lengths[-1]
    prompts = torch.full((n_ctx, l_max), cfg.pad_id, dtype=torch.long)
    for j, s in enumerate(samples):
        prompts[j, : len(s.prompt)] = torch.tensor(s.prompt)
    prompts = prompts.to(dev)
    targets = torch.tensor([s.target for s in samples], device=dev)
    n_score = max(1, cfg.predict_tokens)  # forwards whose logits score or predict the text
    # The text after x_t, fed while RPT predicts (−1: past the window; fed as padding).
    truth = torch.full((n_ctx, n_score), -1, dtype=torch.long)
    for j, s in enumerate(samples):
        known = s.continuation[:n_score] or [s.target]
        truth[j, : len(known)] = torch.tensor(known)
    truth = truth.to(dev)

    request = None
    if cfg.fused_logprobs and vocab is not None:
        request = LogprobRequest(vocab=vocab, last_logits=True)
    ctx = inference.new_context(model, n_ctx, l_max + cfg.thought_length + n_score)
    logits = inference.forward_with_cache(model, prompts[:, :l_min], ctx, pipeline, request)
    out.fed_tokens += n_ctx * l_min
    out.logit_rows += n_ctx if request is not None else n_ctx * l_min
    is_last = pipeline is None or pipeline.is_last

    slots = _Slots.contexts(n_ctx, cfg.thought_length, dev, n_score)
    expanded = 0  # contexts [0, expanded) have their rows in row slots
    harvest = []  # slots of scored rows, dropped from the cache
    close = torch.tensor(cfg.think.close, device=dev)
    pad = torch.tensor(cfg.pad_id, device=dev)
    pos = l_min  # position predicted by `logits`
    while True:
        continuing = slots.score_now & (slots.pred_k + 1 < n_score)  # RPT predicts on
        slots.scored |= slots.score_now & ~continuing
        # The step's one host sync: rows scored so far, and whether any is scored now.
        n_scored, n_now = torch.stack([slots.scored.sum(), slots.score_now.sum()]).tolist()
        if is_last and n_now:  # S_pred = log p(x_t | prompt, thought, </think>) at T = 1
            first = slots.score_now & (slots.pred_k == 0)
            lp_target = inference.token_logprobs(logits, targets[slots.sample], 1.0, vocab)
            slots.s_pred = torch.where(first, lp_target, slots.s_pred)
            if cfg.predict_tokens:  # RPT: ŷ_k+1 ~ p_T(· | …, </think>, x_t … x_t+k−1)
                k = slots.pred_k.clamp(max=n_score - 1)
                keys = sampling_lib.splitmix64(slots.key ^ (cfg.thought_length + k))
                guess = sampling_lib.gumbel_max_sample(logits, keys, cfg.temperature,
                                                       vocab.start, tp_group,
                                                       vocab_size=vocab.vocab_size)
                slots.predicted.scatter_(1, k[:, None], torch.where(
                    slots.score_now, guess, slots.predicted.gather(1, k[:, None])[:, 0])[:, None])
        n_ctx_slots = n_ctx - expanded
        if expanded == n_ctx and n_scored == len(slots):
            harvest.append(slots)
            break
        expand = [j for j in range(expanded, n_ctx) if lengths[j] == pos]
        if expand or n_scored >= max(1.0, COMPACT_FRACTION * len(slots)):
            slots, index = _reindex(slots, n_scored, n_ctx_slots, [batch[j][1] for j in expand],
                                    harvest, lambda rows: sampling_lib.row_keys(
                                        cfg.seed, iteration, rows, 0))
            ctx = inference.reindex_context(model, ctx, index)
            if is_last:
                logits = logits[index]
            expanded += len(expand)
            n_ctx_slots -= len(expand)
        n_row_slots = len(slots) - n_ctx_slots

        sampling = (slots.row >= 0) & ~slots.done
        if is_last:
            # Noise keyed by the thought position u, not the absolute position.
            keys = sampling_lib.splitmix64(slots.key[:n_row_slots] ^ slots.n_tok[:n_row_slots])
            tok = sampling_lib.gumbel_max_sample(logits[:n_row_slots], keys, cfg.temperature,
                                                 vocab.start, tp_group,
                                                 vocab_size=vocab.vocab_size)
            lp = inference.token_logprobs(logits[:n_row_slots], tok, cfg.temperature, vocab)
            tok = torch.nn.functional.pad(tok, (0, n_ctx_slots))
            lp = torch.nn.functional.pad(lp, (0, n_ctx_slots))
        else:
            tok = torch.zeros(len(slots), dtype=torch.long, device=dev)
            lp = torch.zeros(len(slots), device=dev)
        if pipeline is not None:
            tok = pipeline.broadcast_tokens(tok)
        u = slots.n_tok.clamp(max=cfg.thought_length - 1)[:, None]
        for buf, new in ((slots.thought, tok), (slots.logps, lp)):
            buf.scatter_(1, u, torch.where(sampling, new, buf.gather(1, u)[:, 0])[:, None])
        slots.n_tok += sampling.long()
        closed_now = sampling & (tok == cfg.think.close)
        slots.closed |= closed_now
        finished = sampling & (closed_now | (slots.n_tok >= cfg.thought_length))
        slots.done |= finished
        # A thought that ends with a sampled </think> is fed as usual and the next logits score
        # x_t; one that hits the budget is fed its last token, then a forced </think>. Context
        # slots feed their next prompt token; scored rows still in the cache feed padding.
        prompt_tok = prompts[slots.sample, min(pos, l_max - 1)]
        next_tok = torch.where(sampling, tok, torch.where(slots.row < 0, prompt_tok, pad))
        next_tok = torch.where(slots.need_close, close, next_tok)
        continuing = slots.score_now & (slots.pred_k + 1 < n_score)  # (slots reindexed)
        fed_truth = truth[slots.sample, slots.pred_k.clamp(max=n_score - 1)]
        next_tok = torch.where(continuing, torch.where(fed_truth >= 0, fed_truth, pad), next_tok)
        slots.pred_k += slots.score_now.long()
        slots.score_now = closed_now | slots.need_close | continuing
        slots.need_close = finished & ~closed_now
        logits = inference.forward_with_cache(model, next_tok[:, None], ctx, pipeline, request)
        out.fed_tokens += len(slots)
        out.logit_rows += len(slots)
        out.decode_steps += 1
        if out.decode_steps == 1:
            faults.at("rollout", iteration + 1)  # ``iteration`` counts completed iterations
        pos += 1

    done = _Slots(**{f.name: torch.cat([getattr(h, f.name) for h in harvest]).cpu()
                     for f in dataclasses.fields(_Slots)})
    where = {int(r): i for i, r in enumerate(done.row)}
    for sample, rows in batch:
        for row in rows:
            i = where[row]
            n = int(done.n_tok[i])
            out.rows.append(row)
            out.groups.append(sample.group)
            out.thoughts.append(done.thought[i, :n].tolist())
            out.closed.append(bool(done.closed[i]))
            out.behaviour_logprobs.append(done.logps[i, :n].clone())
            out.s_pred.append(float(done.s_pred[i]))
            if cfg.predict_tokens:
                out.predicted.append(done.predicted[i].tolist())


def _reindex(slots: _Slots, n_scored: int, n_ctx_slots: int, expand_rows: list[list[int]],
             harvest: list[_Slots], row_keys) -> tuple[_Slots, torch.Tensor]:
    """Drop the scored rows (kept in ``harvest``) and turn the first ``len(expand_rows)`` context
    slots into one row slot per global row of their group (with its sampling key,
    ``row_keys(rows)``); returns the new slots and the index
    of each new slot in the old ones (for the cache). No host sync: the scored rows' count is
    known, and a stable sort puts them last without looking at which they are."""
    order = torch.argsort(slots.scored.to(torch.int8), stable=True)
    n_live = len(slots) - n_scored
    if n_scored:
        harvest.append(slots.select(order[n_live:]))
    live_rows = n_live - n_ctx_slots  # live row slots come first, context slots keep their order
    k = len(expand_rows)
    counts = torch.tensor([len(r) for r in expand_rows], dtype=torch.long, device=order.device)
    new_rows = sum(len(r) for r in expand_rows)
    index = torch.cat([order[:live_rows],
                       order[live_rows:live_rows + k].repeat_interleave(counts,
                                                                        output_size=new_rows),
                       order[live_rows + k:n_live]])
    out = slots.select(index)
    rows = torch.tensor([r for rows in expand_rows for r in rows], dtype=torch.long,
                        device=order.device)
    out.row[live_rows:live_rows + new_rows] = rows
    out.key[live_rows:live_rows + new_rows] = row_keys(rows)
    return out, index
