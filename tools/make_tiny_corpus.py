"""Build a small real-text corpus and tokenizer locally (no downloads): a SentencePiece model with
``<think>``/``</think>`` and Megatron indexed datasets (.bin/.idx) built by megatron.core's builder.

    python tools/make_tiny_corpus.py OUT_DIR [--source stdlib|kjv|DIR] [--vocab-size 512]
        [--valid-fraction 0.02] [--think-fraction 0.5] [--think-rate 0.1]
        [--think-context 32] [--think-recall 3] [--no-think-tokens]

Sources (text already on the machine):

* ``stdlib`` (default): docstrings of Python standard-library modules (every Python has them);
* ``kjv``: the King James Bible of Debian's ``bible-kjv`` package (4.4 MB; installed with apt-get
  when missing and run as root), one document per chapter (1,189);
* a folder: every ``*.txt`` file under it is one document.

Outputs (pass them to Megatron as ``--tokenizer-type GPTSentencePieceTokenizer --tokenizer-model``
and ``--data-path`` / ``--train-data-path`` / ``--valid-data-path``):

    tokenizer.model              SentencePiece BPE; <think>, </think> are one token each
    corpus_text_document         every document, plain text
    train_text_document          the training documents, plain text
    valid_text_document          the held-out documents (--valid-fraction, a seeded random
                                 choice; never in either training file)
    train_think_text_document    the training documents, --think-fraction of them carrying
                                 <think> … </think> spans (below): an NTP corpus that teaches
                                 the thought format
    corpus.json                  counts, and how often a span's recall predicts the next token

**Thought spans** (``train_think_text_document``). RLP samples a thought after ``x_<t <think>``
and scores ``x_t`` after ``</think>``; a base model whose pretraining text never contained the
format never closes a thought, and a forced ``</think>`` after text it never saw costs more than
any thought gains (measured in issue 15). The paper's base models saw reasoning-formatted text in
pretraining; this corpus gives the tiny model the same, with thoughts it could write itself:

    … x_{t-1} <think> r_1 … r_m </think> x_t …

inserted at each position t of a thinking document with probability ``--think-rate``, where
``r`` is a **recall**: the ≤ m tokens that followed an earlier occurrence of x_{t-1} within the
previous ``--think-context`` tokens (one occurrence chosen uniformly; empty when x_{t-1} did not
occur). The thought is a function of the context alone — exactly what the model sees at RLP time
(``--rlp-context-length`` = ``--think-context``) — never of x_t or later text, so it cannot paste
the answer; it bears on x_t only as far as text repeats itself (``corpus.json`` reports how
often its first token is x_t). Choosing the occurrence at random leaves the policy room RLP can
use: some occurrences predict x_t better than others, and only the reward says which.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

MODULES = [
    "abc", "argparse", "asyncio", "bisect", "calendar", "collections", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools",
    "gzip", "heapq", "hashlib", "inspect", "itertools", "json", "logging", "math", "operator",
    "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex", "shutil", "socket",
    "statistics", "string", "subprocess", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "typing", "unittest", "urllib", "uuid", "warnings", "weakref", "zipfile",
]


def progress(items, total: int, desc: str):
    """Yield ``items`` while drawing a one-line progress bar on stderr (no dependency)."""
    start, width, shown = time.time(), 30, -1
    for i, item in enumerate(items, 1):
        yield item
        filled = width * i // max(total, 1)
        if filled != shown or i == total:
            shown = filled
            bar = "#" * filled
            sys.stderr.write(f"\r{desc:<28} [{bar:<{width}}] {i}/{total} "
                             f"{time.time() - start:5.1f}s")
            sys.stderr.flush()
    sys.stderr.write("\n")


def documents() -> list[str]:
    """Module, class and function docstrings of the stdlib modules above (≥ 200 characters)."""
    docs = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module] + [getattr(module, a) for a in sorted(dir(module))
                              if not a.startswith("_")]
        for obj in objects:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) >= 200 and doc not in docs:
                docs.append(" ".join(doc.split()))
    return docs


def kjv_documents() -> list[str]:
    """The King James Bible (Debian ``bible-kjv``), one document per chapter, verse numbers
    dropped."""
    if shutil.which("bible") is None:
        import os

        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SystemExit("make_tiny_corpus: --source kjv needs Debian's bible-kjv package "
                             "(apt-get install bible-kjv), or pass a folder of .txt files")
        print("make_tiny_corpus: installing bible-kjv (apt-get)", file=sys.stderr)
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "bible-kjv"]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=True)
            subprocess.run(cmd, capture_output=True, check=True)
    text = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True,
                          check=True).stdout
    chapters: OrderedDict[str, list[str]] = OrderedDict()
    for line in text.splitlines():
        m = re.match(r"^(\S+?\d+):\d+ (.*)$", line)
        if m:
            chapters.setdefault(m.group(1), []).append(m.group(2).strip())
    return [" ".join(verses) for verses in chapters.values()]


def folder_documents(folder: Path) -> list[str]:
    return [" ".join(p.read_text(errors="replace").split())
            for p in sorted(folder.rglob("*.txt"))]


def split_documents(docs: list[str], valid_fraction: float, seed: int):
    """(train, valid): a seeded random ``valid_fraction`` of the documents (at least one)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(valid_fraction * len(docs))) if valid_fraction > 0 else 0
    valid = sorted(order[:n_valid])
    held = set(valid)
    return [d for i, d in enumerate(docs) if i not in held], [docs[i] for i in valid]


def train_tokenizer(docs: list[str], out: Path, vocab_size: int, think_tokens: bool) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=progress(docs, len(docs), "tokenizer (reading)"), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
        user_defined_symbols=["<think>", "</think>"] if think_tokens else [],
        minloglevel=2, num_threads=1)
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def recall(tokens: list[int], t: int, context: int, m: int, rng: random.Random) -> list[int]:
    """The ≤ m tokens after a uniformly chosen earlier occurrence of ``tokens[t-1]`` within
    ``tokens[t-context:t]`` (never reaching ``tokens[t]``); [] when there is none."""
    lo, last = max(0, t - context), tokens[t - 1]
    matches = [j for j in range(lo, t - 1) if tokens[j] == last]
    if not matches:
        return []
    j = rng.choice(matches)
    return tokens[j + 1: min(j + 1 + m, t)]


def with_thoughts(tokens: list[int], *, rate: float, context: int, m: int, open_id: int,
                  close_id: int, rng: random.Random, stats: dict) -> list[int]:
    """``tokens`` with a ``<think> recall </think>`` span before each position t ≥ 1 drawn with
    probability ``rate``."""
    out = [tokens[0]] if tokens else []
    for t in range(1, len(tokens)):
        if rng.random() < rate:
            r = recall(tokens, t, context, m, rng)
            out += [open_id, *r, close_id]
            stats["spans"] += 1
            stats["recalls"] += bool(r)
            stats["recall_hits"] += bool(r) and r[0] == tokens[t]
        out.append(tokens[t])
    return out


def write_indexed_dataset(docs, tokenizer_path: Path, prefix: Path, transform=None,
                          desc: str | None = None) -> int:
    """Megatron's .bin/.idx pair of the tokenized documents (``transform(i, ids)`` maps document
    i's ids before the end-of-document token is appended); returns the number of tokens."""
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    n = 0
    items = progress(docs, len(docs), desc) if desc else docs
    for i, doc in enumerate(items):
        ids = sp.encode(doc)
        if transform is not None:
            ids = transform(i, ids)
        ids = ids + [sp.eos_id()]  # Megatron's end-of-document token
        n += len(ids)
        builder.add_item(torch.tensor(ids, dtype=torch.int32))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--source", default="stdlib",
                        help="stdlib (default), kjv, or a folder of .txt files")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    parser.add_argument("--think-fraction", type=float, default=0.5,
                        help="fraction of the training documents that carry thought spans")
    parser.add_argument("--think-rate", type=float, default=0.1,
                        help="probability of a span before each position of such a document")
    parser.add_argument("--think-context", type=int, default=32,
                        help="tokens a recall looks back (= --rlp-context-length)")
    parser.add_argument("--think-recall", type=int, default=3, help="tokens a recall copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-think-tokens", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.source == "stdlib":
        docs = documents()
    elif args.source == "kjv":
        docs = kjv_documents()
    else:
        docs = folder_documents(Path(args.source))
    if not docs:
        raise SystemExit(f"make_tiny_corpus: no documents in --source {args.source}")
    train, valid = split_documents(docs, args.valid_fraction, args.seed)
    print(f"make_tiny_corpus: {len(docs)} documents ({sum(map(len, docs)) / 1e6:.1f} MB) from "
          f"{args.source}: {len(train)} train, {len(valid)} held out", file=sys.stderr)
    t0 = time.time()
    tok = train_tokenizer(train, out, args.vocab_size, not args.no_think_tokens)
    print(f"make_tiny_corpus: SentencePiece BPE, {args.vocab_size} pieces, trained on the "
          f"training documents in {time.time() - t0:.1f}s", file=sys.stderr)
    counts = {"documents": len(docs), "train_documents": len(train),
              "valid_documents": len(valid), "vocab_size": args.vocab_size}
    counts["tokens"] = write_indexed_dataset(docs, tok, out / "corpus_text_document",
                                             desc="corpus_text_document")
    counts["train_tokens"] = write_indexed_dataset(train, tok, out / "train_text_document",
                                                   desc="train_text_document")
    counts["valid_tokens"] = write_indexed_dataset(valid, tok, out / "valid_text_document",
                                                   desc="valid_text_document")
    if not args.no_think_tokens:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tok))
        open_id, close_id = sp.piece_to_id("<think>"), sp.piece_to_id("</think>")
        rng = random.Random(args.seed)
        stats = {"spans": 0, "recalls": 0, "recall_hits": 0}
        thinking = set(rng.sample(range(len(train)), round(args.think_fraction * len(train))))

        def transform(i, ids):
            if i not in thinking:
                return ids
            return with_thoughts(ids, rate=args.think_rate, context=args.think_context,
                                 m=args.think_recall, open_id=open_id, close_id=close_id,
                                 rng=rng, stats=stats)

        counts["train_think_tokens"] = write_indexed_dataset(
            train, tok, out / "train_think_text_document", transform,
            desc="train_think_text_document")
        counts.update(think_documents=len(thinking), think_spans=stats["spans"],
                      spans_with_recall=stats["recalls"],
                      recall_first_token_is_next=stats["recall_hits"] / max(stats["recalls"], 1),
                      think_rate=args.think_rate, think_context=args.think_context,
                      think_recall=args.think_recall)
    (out / "corpus.json").write_text(json.dumps(counts, indent=1) + "\n")
    print(f"{len(docs)} documents, tokenizer {tok}, data {out / 'corpus_text_document'}")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
