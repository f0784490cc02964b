"""Build a small real-text corpus and tokenizer locally (no downloads): a SentencePiece model and a
Megatron indexed dataset (.bin/.idx) of tokenized documents.

    python tools/make_tiny_corpus.py OUT_DIR [--vocab-size 512] [--no-think-tokens]

Documents are the docstrings of Python standard-library modules (text every Python install
ships). ``<think>`` and ``</think>`` are added to the tokenizer as user-defined symbols, so each is
one token, as RLP requires (``--no-think-tokens`` builds a tokenizer without them, to show the
startup check). Output:

    OUT_DIR/tokenizer.model        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model ...
    OUT_DIR/corpus_text_document   --data-path ... (Megatron's .bin/.idx pair)
"""

from __future__ import annotations

import argparse
import importlib
import io
import pkgutil
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


def train_tokenizer(docs: list[str], out: Path, vocab_size: int, think_tokens: bool) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
        user_defined_symbols=["<think>", "</think>"] if think_tokens else [],
        minloglevel=2, num_threads=1)
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def write_indexed_dataset(docs: list[str], tokenizer_path: Path, prefix: Path) -> None:
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for doc in docs:
        ids = sp.encode(doc) + [sp.eos_id()]  # Megatron's end-of-document token
        builder.add_item(torch.tensor(ids, dtype=torch.int32))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--no-think-tokens", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = documents()
    tok = train_tokenizer(docs, out, args.vocab_size, not args.no_think_tokens)
    write_indexed_dataset(docs, tok, out / "corpus_text_document")
    print(f"{len(docs)} documents, tokenizer {tok}, data {out / 'corpus_text_document'}")


if __name__ == "__main__":
    main()
