"""RLP on a real tokenized corpus: Megatron's indexed .bin/.idx dataset and a SentencePiece
tokenizer with <think>/</think> as added symbols, both built locally by tools/make_tiny_corpus.py."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from harness import CPU_FLAGS, REPO, TRAIN_FLAGS, torchrun

GPT = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
       "--seq-length", "256", "--max-position-embeddings", "256", "--position-embedding-type",
       "rope", "--untie-embeddings-and-output-weights", "--normalization", "RMSNorm", "--swiglu",
       "--make-vocab-size-divisible-by", "64", "--seed", "1234", *CPU_FLAGS]
RLP = ["--objective", "rlp", "--rlp-group-size", "4", "--rlp-thought-length", "8",
       "--rlp-min-context", "16", "--train-iters", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run([sys.executable, "tools/make_tiny_corpus.py", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    return out


def _data_flags(corpus):
    return ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
            str(corpus / "tokenizer.model"), "--data-path", str(corpus / "corpus_text_document"),
            "--split", "100,0,0"]


@pytest.mark.slow
def test_rlp_positions_come_from_single_real_documents(corpus, tmp_path):
    """With the paper's v2 instruction prompt prepended (--rlp-prompt-file)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prompt_file = REPO / "examples" / "prompts" / "rlp_v2_prompt.txt"
    torchrun(1, ["-m", "rlp_megatron.train", *GPT, *TRAIN_FLAGS, *_data_flags(corpus), *RLP,
                 "--rlp-prompt-file", str(prompt_file),
                 "--rlp-dump-rollouts", str(tmp_path / "rollouts"),
                 "--rlp-metrics-file", str(tmp_path / "metrics.jsonl")])
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(corpus / "tokenizer.model"))
    think, close, eod = sp.piece_to_id("<think>"), sp.piece_to_id("</think>"), sp.eos_id()
    instruction = sp.encode(prompt_file.read_text())
    docs = IndexedDataset(str(corpus / "corpus_text_document"))
    joined = [np.asarray(docs[i]) for i in range(len(docs))]
    for it in (1, 2):
        r = torch.load(tmp_path / "rollouts" / f"iter{it:07d}_dp0.pt")
        for prompt, target, thought, closed in zip(r["prompts"], r["targets"], r["thoughts"],
                                                   r["closed"]):
            assert prompt[: len(instruction)] == instruction
            context = prompt[len(instruction):-1]
            assert prompt[-1] == think and len(context) >= 16
            assert eod not in context and target != eod
            needle = np.array(context + [target])
            assert any(_contains(d, needle) for d in joined)  # one real document, contiguous
            assert closed == (thought[-1] == close)


def _contains(hay: np.ndarray, needle: np.ndarray) -> bool:
    starts = np.flatnonzero(hay[: len(hay) - len(needle) + 1] == needle[0])
    return any(np.array_equal(hay[s:s + len(needle)], needle) for s in starts)


@pytest.mark.slow
def test_tokenizer_without_think_tokens_fails_at_startup(corpus, tmp_path):
    subprocess.run([sys.executable, "tools/make_tiny_corpus.py", str(tmp_path),
                    "--no-think-tokens"], cwd=REPO, check=True, capture_output=True)
    flags = _data_flags(corpus)
    flags[flags.index("--tokenizer-model") + 1] = str(tmp_path / "tokenizer.model")
    proc = subprocess.run([sys.executable, "-m", "rlp_megatron.train", *GPT, *TRAIN_FLAGS, *flags,
                           *RLP], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlp_megatron: --rlp-think-tokens: '<think>' is ")
    assert "building GPT model" not in proc.stdout


@pytest.mark.slow
def test_truncated_bin_fails_before_training_naming_the_file(corpus, tmp_path):
    """Megatron would open it and fail at the step that reads the lost bytes."""
    import shutil

    prefix = tmp_path / "corpus_text_document"
    shutil.copy(corpus / "corpus_text_document.idx", f"{prefix}.idx")
    data = (corpus / "corpus_text_document.bin").read_bytes()
    (tmp_path / "corpus_text_document.bin").write_bytes(data[: len(data) - 4096])
    flags = _data_flags(corpus)
    flags[flags.index("--data-path") + 1] = str(prefix)
    proc = torchrun(1, ["-m", "rlp_megatron.train", *GPT, *TRAIN_FLAGS, *flags, *RLP],
                    check=False)
    assert proc.returncode != 0
    expected = f"rlp_megatron: indexed dataset: {prefix}.bin has "
    assert any(line.startswith(expected) for line in proc.stderr.splitlines()), proc.stderr[-3000:]
    assert " iteration " not in proc.stdout  # no training step ran
