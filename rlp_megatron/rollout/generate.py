"""Generate G thoughts per context on the training model (TP-sharded, same process, no copy).

Per rollout batch (whole groups, sorted by prompt length so that lengths within a batch are close):

1. prefill: one forward over the distinct prompts' first ``L_min`` tokens (``L_min`` = the batch's
   shortest prompt), i.e. once per context, not once per thought, in a cache sized for exactly
   those prompts;
2. replicate: the KV cache and Mamba conv/SSM states are indexed G-fold into a new cache of one
   row per thought (dense buffers: what Transformer Engine's fused attention requires, see
   :mod:`.inference`);
3. decode: one token per step for all rows. A row still inside its (longer) prompt is fed its
   next prompt token (static batching: every row sits at the same position, which keeps both the
   KV cache and the Mamba recurrence exact without attention masks); a row past its prompt samples
   its next thought token (Gumbel-max over the vocab shards, :mod:`.sampling`) and stops at a
   sampled ``</think>`` or after ``thought_length`` tokens;
4. S_pred: a thought's last token is fed as usual (plus a forced ``</think>`` when it hit the
   budget), and the logits of that forward give S_pred = log p_θ(x_t | prompt, thought,
   ``</think>``) at T = 1 — one more decode step instead of a teacher-forced scoring forward over
   every row (decode ≡ teacher forcing is tested; the update logs the difference as
   ``rlp/s_pred_mismatch``).

With pipeline parallelism each step runs stage by stage (hidden states sent forward), the last
stage samples, and only the sampled token ids (one int64 per row) go back to the other stages —
not Megatron's broadcast of full logits. Every stage tracks the same per-row state from those ids,
so all stages agree on when the batch is done and hold the thoughts for the update.

The cost of static batching is ``L_max − L_min`` extra decode steps per batch, which the length
sort keeps small when a rank holds many groups.

Behaviour log-probs log softmax(l/T)[c_u] are recorded per token at the sampling temperature: the
policy π_θ whose ratio the update takes is the temperature-T distribution that produced c.
"""

from __future__ import annotations

import dataclasses

import torch

from rlp_megatron.data import RLPSample, ThinkTokens
from rlp_megatron.logprobs import LogprobRequest, VocabShard
from rlp_megatron.rollout import inference, sampling


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    thought_length: int
    temperature: float
    seed: int
    think: ThinkTokens
    micro_batch_size: int = 0  # rows per rollout batch; 0 = all rows of the rank at once
    pad_id: int = 0
    fused_logprobs: bool = True  # last-position logits from the hidden states (no output layer)


@dataclasses.dataclass
class Rollout:
    """Thoughts for this rank's rows, in the order of ``rows``."""

    rows: list[int]  # global row index of each thought
    groups: list[int]  # global group index of each thought
    thoughts: list[list[int]]  # sampled tokens, including a sampled </think>
    closed: list[bool]  # ended with a sampled </think>
    behaviour_logprobs: list[torch.Tensor]  # one per thought, len == len(thought)
    s_pred: list[float] = dataclasses.field(default_factory=list)  # last pipeline stage only
    fed_tokens: int = 0  # tokens run through the model: prefills + rows × decode steps
    logit_rows: int = 0  # positions whose logits were computed (fused: the last of each forward)


    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.thoughts)


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


def _generate_batch(model, batch, cfg: RolloutConfig, iteration, vocab: VocabShard | None,
                    tp_group, pipeline, out):
    dev = torch.cuda.current_device()  # Megatron's device (the CPU backend maps it to CPU)
    samples = [s for s, _ in batch]
    rows_per_sample = [len(r) for _, r in batch]
    rows = torch.tensor([r for _, rs in batch for r in rs], dtype=torch.long, device=dev)
    index = torch.repeat_interleave(torch.arange(len(batch), device=dev),
                                    torch.tensor(rows_per_sample, device=dev))
    lengths = torch.tensor([len(s.prompt) for s in samples], device=dev)[index]
    n_rows, l_min, l_max = len(rows), int(lengths.min()), int(lengths.max())
    prompts = torch.full((n_rows, l_max), cfg.pad_id, dtype=torch.long)
    for i, j in enumerate(index.tolist()):
        prompts[i, : len(samples[j].prompt)] = torch.tensor(samples[j].prompt)
    prompts = prompts.to(dev)

    max_len = l_max + cfg.thought_length + 1
    request = None
    if cfg.fused_logprobs and vocab is not None:
        request = LogprobRequest(vocab=vocab, last_logits=True)
    distinct = torch.tensor([s.prompt[:l_min] for s in samples], dtype=torch.long, device=dev)
    prefill_ctx = inference.new_context(model, len(samples), max_len)
    logits = inference.forward_with_cache(model, distinct, prefill_ctx, pipeline,
                                          request)  # once per context
    out.fed_tokens += distinct.numel()
    out.logit_rows += len(samples) if request is not None else distinct.numel()
    ctx = inference.replicate_context(model, prefill_ctx, index)
    del prefill_ctx
    is_last = pipeline is None or pipeline.is_last
    if is_last:
        logits = logits[index]

    thought = torch.full((n_rows, cfg.thought_length), cfg.pad_id, dtype=torch.long, device=dev)
    logps = torch.zeros((n_rows, cfg.thought_length), device=dev)
    n_tok = torch.zeros(n_rows, dtype=torch.long, device=dev)
    closed = torch.zeros(n_rows, dtype=torch.bool, device=dev)
    done = torch.zeros(n_rows, dtype=torch.bool, device=dev)
    targets = torch.tensor([s.target for s in samples], device=dev)[index]
    s_pred = torch.zeros(n_rows, device=dev)
    score_now = torch.zeros(n_rows, dtype=torch.bool, device=dev)  # `logits` predict x_t
    scored = torch.zeros(n_rows, dtype=torch.bool, device=dev)
    need_close = torch.zeros(n_rows, dtype=torch.bool, device=dev)  # feed a forced </think>
    close = torch.full((n_rows,), cfg.think.close, dtype=torch.long, device=dev)
    pos = l_min  # position predicted by `logits`
    pad = torch.full((n_rows,), cfg.pad_id, dtype=torch.long, device=dev)
    while True:
        # Fixed-shape masked updates: the only host sync per step is the `scored` check below.
        if is_last:  # S_pred = log p(x_t | prompt, thought, </think>) at T = 1
            s_pred = torch.where(score_now, inference.token_logprobs(logits, targets, 1.0, vocab),
                                 s_pred)
        scored |= score_now
        if bool(scored.all()):
            break
        sampling_rows = (pos >= lengths) & ~done
        if is_last:
            # Noise keyed by the thought position u, not the absolute position.
            keys = sampling.splitmix64(sampling.row_keys(cfg.seed, iteration, rows, 0) ^ n_tok)
            tok = sampling.gumbel_max_sample(logits, keys, cfg.temperature, vocab.start, tp_group,
                                             vocab_size=vocab.vocab_size)
            lp = inference.token_logprobs(logits, tok, cfg.temperature, vocab)
        else:
            tok, lp = torch.zeros_like(pad), torch.zeros(n_rows, device=dev)
        if pipeline is not None:
            tok = pipeline.broadcast_tokens(tok)
        u = n_tok.clamp(max=cfg.thought_length - 1)[:, None]
        thought.scatter_(1, u, torch.where(sampling_rows, tok, thought.gather(1, u)[:, 0])[:, None])
        logps.scatter_(1, u, torch.where(sampling_rows, lp, logps.gather(1, u)[:, 0])[:, None])
        n_tok += sampling_rows.long()
        closed_now = sampling_rows & (tok == cfg.think.close)
        closed |= closed_now
        finished = sampling_rows & (closed_now | (n_tok >= cfg.thought_length))
        done |= finished
        # A thought that ends with a sampled </think> is fed as usual and the next logits score
        # x_t; one that hits the budget is fed its last token, then a forced </think>.
        prompt_tok = prompts[:, pos] if pos < l_max else pad
        next_tok = torch.where(sampling_rows, tok, torch.where(pos < lengths, prompt_tok, pad))
        next_tok = torch.where(need_close, close, next_tok)
        score_now = closed_now | need_close
        need_close = finished & ~closed_now
        logits = inference.forward_with_cache(model, next_tok[:, None], ctx, pipeline, request)
        out.fed_tokens += n_rows
        out.logit_rows += n_rows
        pos += 1

    thought, logps, n_tok, closed = thought.cpu(), logps.cpu(), n_tok.cpu(), closed.cpu()
    s_pred = s_pred.cpu()
    for i, (row, j) in enumerate(zip(rows.tolist(), index.tolist())):
        n = int(n_tok[i])
        out.rows.append(row)
        out.groups.append(samples[j].group)
        out.thoughts.append(thought[i, :n].tolist())
        out.closed.append(bool(closed[i]))
        out.behaviour_logprobs.append(logps[i, :n].clone())
        out.s_pred.append(float(s_pred[i]))
