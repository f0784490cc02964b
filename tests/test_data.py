"""Positions, prompts and the row layout (pure parts of rlp_megatron.data)."""

import numpy as np
import pytest
import torch

from rlp_megatron.data import (
    PositionConfig, RLPDataset, ThinkTokens, build_sample, document_starts, eligible_positions,
    entropy_candidates, layout_rows, resolve_think_tokens, sample_position, sample_positions)

EOD = 99


def test_document_starts_restart_after_each_eod():
    w = np.array([5, 6, EOD, 7, 8, 9, EOD, EOD, 1])
    assert document_starts(w, EOD).tolist() == [0, 0, 0, 3, 3, 3, 3, 7, 8]


def test_positions_respect_min_context_document_and_target():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 50, 200)
    w[[30, 31, 120]] = EOD
    starts = document_starts(w, EOD)
    seen = set()
    for g in range(300):
        t, start = sample_position(w, EOD, min_context=8, context_length=40, seed=1, group_index=g)
        assert w[t] != EOD
        assert t - starts[t] >= 8  # enough same-document context
        assert start == max(starts[t], t - 40)
        assert EOD not in w[start:t]
        seen.add(t)
    assert len(seen) > 100  # spread over the window, not a fixed position


def test_position_is_a_pure_function_of_seed_and_group():
    w = np.arange(1, 65)
    a = [sample_position(w, EOD, 4, 32, seed=3, group_index=g) for g in range(10)]
    b = [sample_position(w, EOD, 4, 32, seed=3, group_index=g) for g in range(10)]
    c = [sample_position(w, EOD, 4, 32, seed=4, group_index=g) for g in range(10)]
    assert a == b and a != c


def test_short_documents_fall_back_to_the_longest_context():
    w = np.array([1, 2, EOD, 3, EOD, 4, 5, 6, EOD])
    t, start = sample_position(w, EOD, min_context=10, context_length=8, seed=0, group_index=0)
    assert (t, start) == (7, 5)


@pytest.mark.parametrize("window", [
    np.full(16, EOD),  # end-of-document tokens only
    np.array([EOD, 5, EOD, 6, EOD, EOD, 7, EOD]),  # every document is one token long
])
def test_window_without_a_usable_target_still_scores_the_teacher_on_its_target(window):
    """The teacher's row is context + x_t: with an empty context its target position was -1
    (the last, padded position of the row), so S_EMA scored a pad token."""
    s = build_sample(window, 0, eod=EOD, think=ThinkTokens(97, 98), prompt_prefix=[],
                     min_context=4, context_length=8, seed=0)
    assert len(s.context) >= 1
    rows = layout_rows(prompts=[s.context], thoughts=[[]], closed=[True], targets=[s.target],
                       think_close=98, seq_length=len(window))
    pos = int(rows.target_pos[0])
    assert pos >= 0 and rows.labels[0, pos] == s.target
    assert rows.tokens[0, : pos + 1].tolist() == s.context


def test_build_sample_prompt_is_prefix_context_think():
    w = np.arange(10, 74)
    s = build_sample(w, 3, eod=EOD, think=ThinkTokens(97, 98), prompt_prefix=[1, 2],
                     min_context=4, context_length=6, seed=0)
    assert s.prompt[:2] == [1, 2] and s.prompt[-1] == 97
    assert s.prompt[2:-1] == s.context and len(s.context) == 6
    assert s.target == s.context[-1] + 1  # arithmetic window: next value


def test_layout_marks_exactly_the_thought_labels_and_the_target():
    rows = layout_rows(prompts=[[1, 2, 3, 97], [4, 97]], thoughts=[[10, 11, 98], [12, 13]],
                       closed=[True, False], targets=[50, 60], think_close=98, seq_length=12)
    # row 0: 1 2 3 97 10 11 98 50 ; row 1: 4 97 12 13 [98 forced] 60
    assert rows.tokens[0, :7].tolist() == [1, 2, 3, 97, 10, 11, 98]
    assert rows.labels[0, :7].tolist() == [2, 3, 97, 10, 11, 98, 50]
    assert rows.thought_mask[0].nonzero().view(-1).tolist() == [3, 4, 5]
    assert rows.labels[0, rows.thought_mask[0] > 0].tolist() == [10, 11, 98]
    assert rows.labels[0, rows.target_pos[0]].item() == 50
    assert rows.labels[1, rows.thought_mask[1] > 0].tolist() == [12, 13]  # forced </think> untrained
    assert rows.tokens[1, rows.target_pos[1]].item() == 98
    assert rows.labels[1, rows.target_pos[1]].item() == 60
    with pytest.raises(ValueError, match="--seq-length"):
        layout_rows([[1] * 10], [[2] * 5], [True], [3], 98, seq_length=12)


def test_rlp_dataset_groups_read_their_first_window():
    base = [{"tokens": torch.full((4,), i), "labels": torch.full((4,), i + 100)} for i in range(12)]
    ds = RLPDataset(base, group_size=4)
    assert len(ds) == 12
    for i in range(12):
        item = ds[i]
        first = (i // 4) * 4
        assert item["window"].tolist() == [first] * 4 + [first + 100]
        assert item["index"].item() == i


class _Tok:
    """Tokenizes by table; no vocabulary view (so only tokenize() can answer)."""

    def __init__(self, table):
        self.table = table
        self.eod = 0

    def tokenize(self, text):
        return self.table[text]


def test_think_tokens_must_be_single_tokens():
    tok = _Tok({"<think>": [5], "</think>": [6], "<t>": [7, 8]})
    assert resolve_think_tokens(tok, None) == ThinkTokens(5, 6)
    with pytest.raises(ValueError, match="--rlp-think-tokens.*'<t>' is 2 tokens"):
        resolve_think_tokens(tok, ["<t>", "</think>"])
    with pytest.raises(ValueError, match="same id"):
        resolve_think_tokens(tok, ["<think>", "<think>"])


def test_think_tokens_from_a_real_sentencepiece_tokenizer(tmp_path):
    """A vocabulary entry counts even where tokenize() would add SentencePiece's '▁' piece."""
    import sys

    sys.path.insert(0, str(__import__("harness").REPO / "tools"))
    import make_tiny_corpus
    from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import (
        SentencePieceTokenizer)

    docs = make_tiny_corpus.documents()[:300]
    with_think = make_tiny_corpus.train_tokenizer(docs, tmp_path, 300, think_tokens=True)
    tok = SentencePieceTokenizer(str(with_think))
    assert len(tok.text_to_ids("<think>")) == 2  # '▁' + '<think>'
    think = resolve_think_tokens(tok, None)
    assert tok.ids_to_tokens([think.open, think.close]) == ["<think>", "</think>"]
    (tmp_path / "plain").mkdir()
    plain = make_tiny_corpus.train_tokenizer(docs, tmp_path / "plain", 300, think_tokens=False)
    with pytest.raises(ValueError, match="--rlp-think-tokens: '<think>' is [0-9]+ tokens"):
        resolve_think_tokens(SentencePieceTokenizer(str(plain)), None)


def test_make_tiny_corpus_thought_spans_never_see_the_next_token():
    """The demo's NTP corpus teaches the thought format with recall spans; a span before x_t must
    be a function of x_<t only (else NTP would teach pasting the answer into the thought)."""
    import random
    import sys

    sys.path.insert(0, str(__import__("harness").REPO / "tools"))
    import make_tiny_corpus as mtc

    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(2, 40))]
        t = rng.randrange(1, len(tokens))
        seed = rng.random()
        r = mtc.recall(tokens, t, 8, 3, random.Random(seed))
        changed = tokens[:t] + [t + 100] + tokens[t + 1:]
        assert mtc.recall(changed, t, 8, 3, random.Random(seed)) == r
        assert len(r) <= 3 and 100 + t not in mtc.recall(changed, t, 8, 3, random.Random(seed))
        if r:  # the tokens after an occurrence of x_{t-1} within the last 8
            starts = [j + 1 for j in range(max(0, t - 8), t - 1) if tokens[j] == tokens[t - 1]]
            assert any(tokens[j:j + len(r)] == r for j in starts)
    stats = {"spans": 0, "recalls": 0, "recall_hits": 0}
    doc = [rng.randrange(2, 6) for _ in range(300)]
    out = mtc.with_thoughts(doc, rate=0.2, context=8, m=3, open_id=0, close_id=1,
                            rng=random.Random(1), stats=stats)
    assert _strip_spans(out, 0, 1) == doc and out.count(0) == out.count(1) == stats["spans"] > 30


def _strip_spans(tokens, open_id, close_id):
    """``tokens`` without its whole ``open … close`` spans."""
    kept, inside = [], False
    for x in tokens:
        inside = (inside or x == open_id) and x != close_id
        if not inside and x != close_id:
            kept.append(x)
    return kept


def test_make_tiny_corpus_held_out_split_and_datasets(tmp_path):
    """--source DIR: documents split into disjoint train/valid; the tokenizer knows the thought
    tokens as single pieces; the think corpus is the train corpus plus whole spans."""
    import json
    import subprocess
    import sys

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import (
        SentencePieceTokenizer)

    repo = __import__("harness").REPO
    sys.path.insert(0, str(repo / "tools"))
    import make_tiny_corpus as mtc

    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(mtc.documents()[:120]):
        (src / f"{i:03d}.txt").write_text(f"Document {i}. {doc}")  # no duplicates
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(repo / "tools/make_tiny_corpus.py"), str(out),
                    "--source", str(src), "--vocab-size", "300", "--valid-fraction", "0.1"],
                   check=True, capture_output=True)
    counts = json.loads((out / "corpus.json").read_text())
    assert (counts["train_documents"], counts["valid_documents"]) == (108, 12)
    data = {n: IndexedDataset(str(out / f"{n}_text_document"))
            for n in ("corpus", "train", "valid", "train_think")}
    docs = {n: [tuple(d[i].tolist()) for i in range(len(d))] for n, d in data.items()}
    assert not set(docs["train"]) & set(docs["valid"])
    assert sorted(docs["train"] + docs["valid"]) == sorted(docs["corpus"])
    tok = SentencePieceTokenizer(str(out / "tokenizer.model"))
    think = resolve_think_tokens(tok, None)
    spans = 0
    for plain, thinking in zip(docs["train"], docs["train_think"]):
        spans += thinking.count(think.open)
        assert thinking.count(think.open) == thinking.count(think.close)
        assert tuple(_strip_spans(thinking, think.open, think.close)) == plain
    assert spans == counts["think_spans"] > 0


def test_think_tokens_must_be_ids_of_the_vocabulary():
    """NullTokenizer "tokenizes" any integer text to that integer: an id past the vocabulary
    (or negative) would otherwise reach the embedding lookup mid-rollout."""
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    tok = NullTokenizer(vocab_size=4097)
    assert resolve_think_tokens(tok, ["4094", "4095"]) == ThinkTokens(4094, 4095)
    for spec in (["4095", "99999"], ["-3", "7"]):
        with pytest.raises(ValueError, match=r"--rlp-think-tokens: .* outside the vocabulary"):
            resolve_think_tokens(tok, spec)


# ---------------------------------------------------------------------------------------------
# Position selection (--rlp-positions, --rlp-positions-per-doc)


def _doc_window():
    # one document of 40 tokens, an eod, then 23 more
    return np.array([*range(1, 41), EOD, *range(41, 64)])


def test_uniform_draw_of_one_position_is_unchanged_by_the_k_positions_code():
    """K = 1 with every eligible position a candidate is the paper's draw, as before: one
    rng.choice over the eligible positions, keyed by (seed, group)."""
    w = _doc_window()
    for g in range(20):
        valid, starts = eligible_positions(w, EOD, 4)
        t = int(np.random.default_rng([7, g]).choice(valid))
        assert sample_position(w, EOD, 4, 16, seed=7, group_index=g) == (
            t, max(int(starts[t]), t - 16))


def test_k_positions_per_window_are_distinct_and_the_first_is_the_k1_draw():
    w = _doc_window()
    for b in range(10):
        picks = sample_positions(w, EOD, 4, 16, seed=3, window_index=b, k=4)
        ts = [t for t, _ in picks]
        assert len(set(ts)) == 4
        assert picks[0] == sample_position(w, EOD, 4, 16, seed=3, group_index=b)
    # fewer candidates than K: each candidate once, then over again
    picks = sample_positions(w, EOD, 4, 16, seed=3, window_index=0, k=3, candidates=[10, 20])
    assert sorted(t for t, _ in picks[:2]) == [10, 20] and picks[2][0] in (10, 20)


def _entropy(w):
    rng = np.random.default_rng(0)
    return rng.permutation(len(w)).astype(float) / 10  # distinct entropies, h[t] predicts w[t]


def test_entropy_candidates_top_fraction_threshold_and_fallback():
    w = _doc_window()
    h = _entropy(w)
    valid, _ = eligible_positions(w, EOD, 4)
    cfg = PositionConfig(strategy="entropy", top_fraction=0.25)
    top = entropy_candidates(valid, h, cfg, iteration=1)
    n = len(valid)
    assert len(top) == int(np.ceil(0.25 * n))
    assert h[top].min() > np.sort(h[valid])[::-1][len(top)]  # exactly the highest ones
    thr = PositionConfig(strategy="entropy", threshold=4.0)
    assert entropy_candidates(valid, h, thr, 1).tolist() == sorted(valid[h[valid] >= 4.0])
    # a threshold no position reaches: the K highest-entropy positions, not nothing
    none = PositionConfig(strategy="entropy", threshold=1e9)
    assert entropy_candidates(valid, h, none, 1, k=2).tolist() == sorted(
        valid[np.argsort(-h[valid])[:2]])


def test_curriculum_band_moves_from_the_lowest_entropies_to_the_highest():
    w = _doc_window()
    h = _entropy(w)
    valid, _ = eligible_positions(w, EOD, 4)
    cfg = PositionConfig(strategy="curriculum", top_fraction=0.2, curriculum_iters=10,
                         curriculum_start=100)
    ranked = valid[np.argsort(h[valid])]  # easy (low entropy) first
    k = int(np.ceil(0.2 * len(valid)))
    assert entropy_candidates(valid, h, cfg, 100).tolist() == sorted(ranked[:k])  # easiest
    assert entropy_candidates(valid, h, cfg, 50).tolist() == sorted(ranked[:k])  # before start
    assert entropy_candidates(valid, h, cfg, 110).tolist() == sorted(ranked[-k:])  # hardest
    assert entropy_candidates(valid, h, cfg, 999).tolist() == sorted(ranked[-k:])
    means = [h[entropy_candidates(valid, h, cfg, it)].mean() for it in range(100, 111)]
    assert all(a <= b for a, b in zip(means, means[1:])) and means[0] < means[-1]


def test_k_groups_of_a_window_read_its_first_index():
    base = [{"tokens": torch.full((4,), i), "labels": torch.full((4,), i + 100)} for i in range(16)]
    ds = RLPDataset(base, group_size=2, per_doc=4)  # K·G = 8 rows per window
    for i in range(16):
        first = (i // 8) * 8
        assert ds[i]["window"].tolist() == [first] * 4 + [first + 100]
