"""The rollout engine in-process, on a small Megatron hybrid model (Mamba + attention with RoPE):
what a decode step computes and how much of it there is.

* A decode step rotates only the new key (the cache holds rotated keys), with logits bitwise equal
  to Megatron's static path, which re-rotates the whole cached key sequence at every step.
* Every prompt is fed once per context and every row stops costing compute once its thought is
  scored: the tokens fed equal the tokens that must be fed, with prompts of mixed lengths.
* The thoughts do not depend on how the rows are batched (all at once, one group per batch, or a
  group split across batches).
"""

from __future__ import annotations

import pytest
import torch

import rlp_megatron  # noqa: F401  (enables the CPU backend before any Megatron model code runs)
from harness import tiny_hybrid
from rlp_megatron import megatron_fixes
from rlp_megatron.backends import mamba_torch
from rlp_megatron.data import RLPSample, ThinkTokens
from rlp_megatron.logprobs import VocabShard
from rlp_megatron.rollout import generate as rollout_lib
from rlp_megatron.rollout import inference

V, G, THOUGHT = 97, 4, 10


@pytest.fixture(scope="module")
def model(model_parallel):
    mamba_torch.install()  # fix 5: batched Mamba decode
    megatron_fixes.install_seams()  # the output-processor seam and the rotated-key cache
    return tiny_hybrid().eval()


def _record_rotations(monkeypatch) -> list[int]:
    """Sequence lengths of the tensors that the attention layers rotate, in call order."""
    from megatron.core.transformer import attention

    lengths, original = [], attention.apply_rotary_pos_emb

    def recording(t, freqs, *args, **kwargs):
        lengths.append(t.shape[0])
        return original(t, freqs, *args, **kwargs)

    monkeypatch.setattr(attention, "apply_rotary_pos_emb", recording)
    return lengths


def _decode(model, tokens, prompt, ctx):
    """Logits of every position from ``prompt`` on: one prefill, then one token per step."""
    steps = []
    with inference.inference_mode(model):
        steps.append(inference.forward_with_cache(model, tokens[:, :prompt], ctx))
        for t in range(prompt, tokens.shape[1] - 1):
            steps.append(inference.forward_with_cache(model, tokens[:, t:t + 1], ctx))
    return torch.stack(steps, 1)


def test_decode_rotates_only_the_new_key_and_changes_no_logit(model, monkeypatch):
    torch.manual_seed(0)
    tokens, prompt = torch.randint(0, V, (3, 24)), 9
    upstream = inference.new_context(model, 3, 24)
    upstream.rotated_key_cache = False  # Megatron's static path: rotate the cache at every step
    reference = _decode(model, tokens, prompt, upstream)

    lengths = _record_rotations(monkeypatch)
    ours = _decode(model, tokens, prompt, inference.new_context(model, 3, 24))
    # One attention layer: query and key rotated once per forward; the prefill's are 9 long.
    assert lengths[:2] == [prompt, prompt]
    assert lengths[2:] == [1] * (2 * (tokens.shape[1] - 1 - prompt)), lengths
    assert torch.equal(ours, reference)


def _close_token(model) -> int:
    """The id the untrained model predicts most often, so that some thoughts close early."""
    with torch.no_grad():
        tokens = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(1))
        logits = model(tokens, torch.arange(16).expand(4, -1), None)
    return int(logits.log_softmax(-1).exp().mean((0, 1))[: V - 2].argmax())


def _work(close: int, lengths=(5, 12, 8, 17)):
    """Groups with prompts of mixed lengths (context + <think>), G global rows each."""
    gen = torch.Generator().manual_seed(3)
    think = ThinkTokens(open=V - 1, close=close)
    work = []
    for g, n in enumerate(lengths):
        context = torch.randint(0, V - 2, (n,), generator=gen).tolist()
        sample = RLPSample(group=g, prompt=[*context, think.open], target=context[0],
                           context=context)
        work.append((sample, list(range(g * G, (g + 1) * G))))
    return think, work


def _rollout(model, micro_batch_size: int):
    close = _close_token(model)
    think, work = _work(close)
    cfg = rollout_lib.RolloutConfig(thought_length=THOUGHT, temperature=1.0, seed=5, think=think,
                                    micro_batch_size=micro_batch_size)
    out = rollout_lib.generate(model, work, cfg, iteration=1,
                               vocab=VocabShard(start=0, size=V, vocab_size=V))
    return out, work


def test_rollout_feeds_each_prompt_once_and_drops_scored_rows(model):
    out, work = _rollout(model, micro_batch_size=0)  # every group in one batch
    closed, budget = sum(out.closed), sum(not c for c in out.closed)
    print(f"{closed} thoughts closed, {budget} hit the budget")
    assert closed and budget  # both endings are exercised
    # Prompts once per context; each row its thought, plus the forced </think> at the budget
    # (the forward whose logits give S_pred). Nothing else: no prompt tail fed G-fold, no idle
    # row fed padding while the batch's longest thought finishes.
    useful = (sum(len(s.prompt) for s, _ in work)
              + sum(len(t) + (not c) for t, c in zip(out.thoughts, out.closed)))
    assert out.fed_tokens == useful
    assert sorted(out.rows) == list(range(len(work) * G))


@pytest.mark.parametrize("micro_batch_size", [G, 3])
def test_rollout_does_not_depend_on_the_batching(model, micro_batch_size):
    """One batch of every group against one group per batch (no padding at all), and against
    batches that split a group."""
    ref, _ = _rollout(model, micro_batch_size=0)
    out, _ = _rollout(model, micro_batch_size=micro_batch_size)
    order = [out.rows.index(r) for r in ref.rows]
    assert [out.thoughts[i] for i in order] == ref.thoughts
    assert [out.closed[i] for i in order] == ref.closed
    for i, j in enumerate(order):
        torch.testing.assert_close(out.behaviour_logprobs[j], ref.behaviour_logprobs[i],
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([out.s_pred[i] for i in order]),
                               torch.tensor(ref.s_pred), atol=1e-5, rtol=0)
