"""RLP samples from Megatron's GPT datasets: positions, prompts, and the fixed-length row layout.

What a row is. RLP keeps Megatron's unit of data: one dataset sample (a ``seq_length`` window of
the token stream, as NTP reads it) per row, ``--global-batch-size`` rows per step, so consumed
samples, the data cursor and resume work unchanged. A *group* is G = ``--rlp-group-size``
consecutive rows (global sample indices ``G·k … G·k+G−1``); all of them read the window of the
group's first index, sample the same position t, and differ only in their thoughts. The other
G−1 windows of a group are skipped, so switching between NTP and RLP never revisits data. With
K = ``--rlp-positions-per-doc`` > 1, the K·G rows of K consecutive groups read the window of
their first index, and the K groups take K distinct positions of it (window index
``row // (K·G)``, position j = ``group mod K`` of the window's draw).

Positions (the paper: "one random token per document/sequence", distribution unspecified). Per
group, t is uniform over the positions of the window whose target x_t is not an end-of-document
token and that have at least ``--rlp-min-context`` tokens of the same document before them; the
context is the last ≤ ``--rlp-context-length`` tokens of that document before t (it never crosses
an end-of-document token). ``--rlp-positions entropy|curriculum`` restrict the draw to
positions by next-token entropy (:class:`PositionConfig`; the entropies come from one
teacher-forced forward of the window, rlp_megatron.step). If no position qualifies, the one with
the longest same-document context is used; a context is never empty (a target that starts a
document is conditioned on the end-of-document token before it, as NTP conditions it). The draw
is a pure function of (seed, window index) — and of the window's entropies and the iteration,
when they select — hence independent of the parallel layout and reproducible on resume without
saving RNG state.

Row layout (what the model sees; ``[p]`` = optional ``--rlp-prompt-file`` instruction tokens):

    [p] context <think> c_1 … c_n </think> x_t  pad …

The thought c is sampled by the policy and may end with a sampled ``</think>`` (then it belongs
to c and is trained); a thought that reaches ``--rlp-thought-length`` without closing gets a forced
``</think>`` that is not part of c. S_pred is log p(x_t) at the position after ``</think>``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

PAPER_PROMPT_V2 = (
    "You are a continuation-and-reasoning assistant. You receive the prefix of a context, problem, "
    "solution, or derivation. First, briefly think between <think> and </think> about what should "
    "come next. Then, after </think>, continue the text in the SAME style as the prefix (notation, "
    "LaTeX, tone), focusing on the next few steps rather than jumping to a final boxed answer. Do "
    "not restate the question or add meta commentary; simply continue the content."
)


@dataclasses.dataclass(frozen=True)
class ThinkTokens:
    open: int
    close: int


def resolve_think_tokens(tokenizer, spec: list[str] | None) -> ThinkTokens:
    """Ids of the two delimiters; raises ValueError naming ``--rlp-think-tokens`` if either is not
    one token of the tokenizer (a vocabulary entry, e.g. an added special token, or text that
    tokenizes to exactly one id). NullTokenizer (mock data) reserves the two ids below eod."""
    if spec is None and (type(tokenizer).__name__ == "NullTokenizer"
                         or _is_null_tokenizer(tokenizer)):
        eod = int(tokenizer.eod)
        return ThinkTokens(open=eod - 2, close=eod - 1)
    texts = spec or ["<think>", "</think>"]
    ids = [_single_token_id(tokenizer, text) for text in texts]
    size = getattr(tokenizer, "vocab_size", None)
    for text, i in zip(texts, ids):
        if i < 0 or (isinstance(size, int) and i >= size):
            raise ValueError(f"--rlp-think-tokens: {text!r} is id {i}, outside the vocabulary "
                             f"[0, {size})")
    if ids[0] == ids[1]:
        raise ValueError("--rlp-think-tokens: the two delimiters map to the same id")
    return ThinkTokens(open=ids[0], close=ids[1])


def _single_token_id(tokenizer, text: str) -> int:
    try:
        vocab = tokenizer.vocab
    except Exception:  # tokenizers without a vocabulary view
        vocab = None
    if isinstance(vocab, dict) and text in vocab:  # HuggingFace-style {token: id}
        return int(vocab[text])
    if isinstance(vocab, (list, tuple)) and text in vocab:  # SentencePiece-style [piece by id]
        return vocab.index(text)
    encode = getattr(tokenizer, "tokenize", None) or getattr(tokenizer, "text_to_ids")
    try:
        toks = list(encode(text))
    except Exception as exc:  # tokenizers raise all sorts of things on unknown input
        raise ValueError(f"--rlp-think-tokens: cannot tokenize {text!r}: {exc}") from exc
    if len(toks) != 1:
        raise ValueError(
            f"--rlp-think-tokens: {text!r} is {len(toks)} tokens {toks} for this tokenizer; "
            f"each delimiter must be exactly one token (add it as a special token or name "
            f"another one)")
    return int(toks[0])


def _is_null_tokenizer(tokenizer) -> bool:
    inner = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "tokenizer", None)
    return inner is not None and type(inner).__name__ == "NullTokenizer"


def load_prompt_tokens(tokenizer, path: str | None) -> list[int]:
    """Instruction tokens prepended to every prompt (``--rlp-prompt-file``; none by default)."""
    if not path:
        return []
    text = Path(path).read_text()
    return [int(t) for t in tokenizer.tokenize(text)]


def check_indexed_dataset(prefix: str) -> None:
    """ValueError naming the file unless ``prefix.bin`` is exactly as long as ``prefix.idx``
    says. Megatron opens a truncated .bin, or a .bin next to another corpus's .idx, without
    complaint and fails ("buffer is smaller than requested size") only when a step reads a
    damaged sample, or reads another corpus's bytes silently. (A .bin of exactly the expected
    size but other contents cannot be told apart here.)"""
    import os

    from megatron.core.datasets.indexed_dataset import _IndexReader

    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise ValueError(f"indexed dataset: {path} does not exist")
    try:
        index = _IndexReader(idx, multimodal=False)
    except Exception as exc:  # a damaged header, a short file
        raise ValueError(f"indexed dataset: cannot read {idx}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    expected = 0
    if len(index.sequence_lengths):
        expected = (int(index.sequence_pointers[-1])
                    + int(index.sequence_lengths[-1]) * index.dtype_size)
    actual = os.path.getsize(bin_)
    if actual != expected:
        raise ValueError(f"indexed dataset: {bin_} has {actual} bytes but {idx} describes "
                         f"{expected} ({len(index.sequence_lengths)} sequences): a truncated "
                         f".bin, or an .idx of another file")


# ---------------------------------------------------------------------------------------------
# Position sampling (pure numpy, deterministic per group)


def document_starts(window: np.ndarray, eod: int) -> np.ndarray:
    """start[t] = index of the first token of the document containing position t."""
    is_eod = window == eod
    # A document starts right after each eod (and at 0).
    start_marks = np.zeros(len(window), dtype=np.int64)
    start_marks[1:] = np.where(is_eod[:-1], np.arange(1, len(window)), 0)
    return np.maximum.accumulate(start_marks)


POSITIONS = ("uniform", "entropy", "curriculum")  # --rlp-positions


@dataclasses.dataclass(frozen=True)
class PositionConfig:
    """How positions are chosen (``--rlp-positions*``, ``--rlp-entropy-*``, ``--rlp-curriculum-*``).

    * ``uniform`` (the paper's, RLP v2 §3): uniform over the eligible positions.
    * ``entropy`` (RPT's "hard" tokens, arXiv 2506.08007 §3): uniform over the eligible positions
      whose next-token entropy H(p(· | window before t)) is ≥ ``threshold`` nats, or, without a
      threshold, in the top ``top_fraction`` of the window's eligible positions by entropy.
    * ``curriculum`` (easy → hard, Reinforcement Mid-Training, arXiv 2509.24375): uniform over the
      eligible positions whose entropy rank lies in a band of width ``top_fraction`` that slides
      from the lowest entropies (iteration ``curriculum_start``) to the highest (from
      ``curriculum_start + curriculum_iters`` on), linearly in the iteration.
    """

    strategy: str = "uniform"
    per_doc: int = 1  # K positions (groups) per window
    top_fraction: float = 0.5
    threshold: float | None = None
    curriculum_iters: int = 1000
    curriculum_start: int = 0
    entropy_model: str = "policy"  # θ ("policy") or φ ("teacher") computes the entropy

    @property
    def needs_entropy(self) -> bool:
        return self.strategy != "uniform"

    def band(self, iteration: int) -> tuple[float, float]:
        """Quantile band [lo, hi) of the eligible positions' entropies at ``iteration``: of n
        eligible positions sorted by entropy, ranks ⌊lo·n⌋ … ⌊lo·n⌋ + ⌈f·n⌉ − 1."""
        f = self.top_fraction
        if self.strategy == "entropy":
            return 1.0 - f, 1.0
        progress = min(1.0, max(0.0, (iteration - self.curriculum_start)
                                / max(1, self.curriculum_iters)))
        lo = progress * (1.0 - f)
        return lo, lo + f


def eligible_positions(window: np.ndarray, eod: int, min_context: int):
    """(valid targets t, document starts): t whose target is not eod and that has at least
    ``min_context`` same-document tokens before it."""
    starts = document_starts(window, eod)
    t_all = np.arange(1, len(window))
    ctx_len = t_all - starts[t_all]
    ok_target = window[t_all] != eod
    return t_all[ok_target & (ctx_len >= min_context)], starts


def entropy_candidates(valid: np.ndarray, entropy: np.ndarray, cfg: PositionConfig,
                       iteration: int, k: int = 1) -> np.ndarray:
    """The positions of ``valid`` that ``cfg`` allows; ``entropy[t]`` is the entropy of the
    distribution that predicts ``window[t]``. Never fewer than min(k, len(valid)): if the rule
    leaves fewer, the k positions nearest the band (by entropy rank) are used."""
    n = len(valid)
    if n == 0:
        return valid
    h = np.asarray(entropy, dtype=np.float64)[valid]
    if cfg.strategy == "entropy" and cfg.threshold is not None:
        chosen = valid[h >= cfg.threshold]
        if len(chosen) >= min(k, n):
            return chosen
        return np.sort(valid[np.argsort(-h, kind="stable")[: min(k, n)]])
    lo, _ = cfg.band(iteration)
    order = np.argsort(h, kind="stable")  # ascending entropy; ties by position
    m = min(n, max(int(np.ceil(cfg.top_fraction * n - 1e-9)), k))  # the band's width
    a = min(int(np.floor(lo * n + 1e-9)), n - m)
    return np.sort(valid[order[a:a + m]])


def sample_positions(window: np.ndarray, eod: int, min_context: int, context_length: int,
                     seed: int, window_index: int, k: int = 1, candidates=None
                     ) -> list[tuple[int, int]]:
    """``k`` (t, context_start) pairs for one window, distinct while there are enough
    candidates (``candidates``: the eligible positions to draw from, default all of them);
    context = window[context_start:t], target = window[t]. ``k = 1`` with every eligible
    position a candidate is the paper's uniform draw."""
    valid, starts = eligible_positions(window, eod, min_context)
    if candidates is not None and len(valid) > 0:
        valid = np.asarray(candidates)
    if len(valid) > 0:
        rng = np.random.default_rng([seed, window_index])
        picks, left = [], valid
        for _ in range(k):  # without replacement, then over again (fewer candidates than k)
            if len(left) == 0:
                left = valid
            t = int(rng.choice(left))
            picks.append(t)
            left = left[left != t]
    else:
        t_all = np.arange(1, len(window))
        candidates = t_all[(window[t_all] != eod) & (t_all - starts[t_all] >= 1)]
        if len(candidates) == 0:  # a window made of eods only
            candidates = t_all
        picks = [int(candidates[np.argmax(candidates - starts[candidates])])] * k
    out = []
    for t in picks:
        start = max(int(starts[t]), t - context_length)
        # A target at the start of a document (a window with no usable position) still gets
        # one token of context: the end-of-document token before it, as NTP conditions it.
        out.append((t, min(start, t - 1)))
    return out


def sample_position(window: np.ndarray, eod: int, min_context: int, context_length: int,
                    seed: int, group_index: int) -> tuple[int, int]:
    """(t, context_start) for one group: the paper's uniform draw, one position per window."""
    return sample_positions(window, eod, min_context, context_length, seed, group_index)[0]


@dataclasses.dataclass
class RLPSample:
    """One group's prompt and target, built on the loader rank and broadcast to the others."""

    group: int  # global group index (= global row index // G)
    prompt: list[int]  # [p] context <think>
    target: int  # x_t
    context: list[int]  # context alone (the EMA teacher's input)
    position: int = 0  # t, in the window
    window: np.ndarray | None = None  # the window the position was drawn from

    @property
    def continuation(self) -> list[int]:
        """x_t, x_t+1, … to the end of the window (RPT's ground truth)."""
        if self.window is None:
            return [self.target]
        return [int(x) for x in self.window[self.position:]]


def build_sample(window: np.ndarray, group: int, *, eod: int, think: ThinkTokens,
                 prompt_prefix: list[int], min_context: int, context_length: int,
                 seed: int, position: tuple[int, int] | None = None) -> RLPSample:
    """The group's sample at ``position`` (t, context_start), by default the paper's uniform
    draw for the group."""
    t, start = position or sample_position(window, eod, min_context, context_length, seed,
                                           group)
    context = [int(x) for x in window[start:t]]
    return RLPSample(group=group, prompt=[*prompt_prefix, *context, think.open],
                     target=int(window[t]), context=context, position=t, window=window)


class RLPDataset(torch.utils.data.Dataset):
    """Megatron GPT dataset → one row per sample index; the K·G consecutive rows of K groups
    (``per_doc`` = K = ``--rlp-positions-per-doc``) share one window.

    Yields the base sample of the row itself (so an interleaved NTP iteration trains on it as
    usual) plus ``"window"`` (LongTensor[seq_length + 1], the window of the block's first index,
    see the module docstring) and ``"index"`` (the global sample index)."""

    def __init__(self, base, group_size: int, per_doc: int = 1):
        self.base = base
        self.group_size = group_size
        self.block = group_size * per_doc

    def __len__(self):
        return len(self.base)

    def __getitem__(self, idx):
        first = (idx // self.block) * self.block
        own = self.base[idx]
        group = own if first == idx else self.base[first]
        window = torch.cat([torch.as_tensor(group["tokens"]), torch.as_tensor(group["labels"][-1:])])
        return {**own, "window": window.long(), "index": torch.tensor(idx, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------
# Row layout for the scoring and update forwards


@dataclasses.dataclass
class Rows:
    """Rows of one width (PP needs one shape per step) for a set of thoughts; all [n, width]:
    ``--seq-length``, or with ``trim`` the longest row's length."""

    tokens: torch.Tensor
    labels: torch.Tensor
    thought_mask: torch.Tensor  # 1 where labels[j] is a thought token (trained)
    target_pos: torch.Tensor  # [n] position whose label is x_t
    position_ids: torch.Tensor


def layout_rows(prompts: list[list[int]], thoughts: list[list[int]], closed: list[bool],
                targets: list[int], think_close: int, seq_length: int, pad: int = 0,
                trim: bool = False) -> Rows:
    """Lay out ``prompt + thought (+ forced </think>) + x_t`` per row, right-padded to
    ``seq_length`` (with ``trim``: to the longest row, so no forward computes padding past it)."""
    n = len(prompts)
    tokens = torch.full((n, seq_length), pad, dtype=torch.long)
    labels = torch.full((n, seq_length), pad, dtype=torch.long)
    thought_mask = torch.zeros((n, seq_length), dtype=torch.float)
    target_pos = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        if not prompts[i]:
            raise ValueError("empty prompt: every row needs at least one token before its target")
        seq = [*prompts[i], *thoughts[i]]
        if not closed[i]:
            seq.append(think_close)
        seq.append(targets[i])
        if len(seq) > seq_length + 1:
            raise ValueError(f"row of {len(seq)} tokens exceeds --seq-length {seq_length} + 1")
        seq_t = torch.tensor(seq, dtype=torch.long)
        m = len(seq) - 1
        tokens[i, :m] = seq_t[:-1]
        labels[i, :m] = seq_t[1:]
        p = len(prompts[i])
        # labels[j] = seq[j + 1]: thought token u (0-based) sits at seq[p + u], i.e. label p + u - 1.
        thought_mask[i, p - 1 : p - 1 + len(thoughts[i])] = 1.0
        target_pos[i] = m - 1
    width = int(target_pos.max()) + 1 if trim and n else seq_length
    position_ids = torch.arange(width)[None].expand(n, width).contiguous()
    return Rows(tokens[:, :width].contiguous(), labels[:, :width].contiguous(),
                thought_mask[:, :width].contiguous(), target_pos, position_ids)
