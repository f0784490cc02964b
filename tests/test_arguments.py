"""Bad --rlp-* values fail at startup, before any model is built, with one line naming the flag."""

import argparse
import subprocess
import sys

import pytest

from harness import REPO, TINY_GPT, TRAIN_FLAGS
from rlp_megatron import arguments


class NullTokenizer:  # named like Megatron's, which resolve_think_tokens recognises
    eod = 127

    def tokenize(self, text):
        return [int(x) for x in text.split()]


def _args(**overrides):
    parser = argparse.ArgumentParser()
    arguments.add_rlp_args(parser)
    args = parser.parse_args(["--objective", "rlp", "--rlp-context-length", "32",
                              "--rlp-thought-length", "16"])
    for k, v in dict(seed=1, global_batch_size=32, seq_length=64, max_position_embeddings=64,
                     pipeline_model_parallel_size=1, context_parallel_size=1,
                     virtual_pipeline_model_parallel_size=None).items():
        setattr(args, k, v)
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@pytest.fixture(autouse=True)
def null_tokenizer(monkeypatch):
    monkeypatch.setattr(arguments, "_tokenizer", lambda args: NullTokenizer())


def test_defaults_are_the_papers():
    cfg = arguments.RLPConfig()
    assert (cfg.group_size, cfg.thought_length, cfg.context_length, cfg.temperature,
            cfg.ema_decay) == (16, 2048, 2048, 0.7, 0.999)


def test_valid_arguments_pass_and_seed_defaults_to_megatron_seed():
    args = _args()
    arguments.validate_rlp_args(args)
    assert args.rlp_seed == 1
    assert arguments.RLPConfig.from_args(args).group_size == 16


def test_default_context_length_shrinks_to_fit_seq_length_but_explicit_values_do_not():
    args = _args(rlp_context_length=None)  # seq 64, thought 16: 64 - 16 - 2 = 46 context tokens
    arguments.validate_rlp_args(args)
    assert args.rlp_context_length == 46
    with pytest.raises(SystemExit, match="--rlp-context-length \\(47\\)"):
        arguments.validate_rlp_args(_args(rlp_context_length=47))
    with pytest.raises(SystemExit, match="--rlp-thought-length \\(62\\) leaves no room"):
        arguments.validate_rlp_args(_args(rlp_context_length=None, rlp_thought_length=62))


@pytest.mark.parametrize("overrides, flag", [
    (dict(rlp_group_size=1), "--rlp-group-size must be an integer >= 2"),
    (dict(rlp_thought_length=0), "--rlp-thought-length must be >= 1"),
    (dict(rlp_context_length=-3), "--rlp-context-length must be >= 1"),
    (dict(rlp_temperature=0.0), "--rlp-temperature must be > 0"),
    (dict(rlp_clip_eps_low=1.0), "--rlp-clip-eps-low must be in [0, 1)"),
    (dict(rlp_ema_decay=1.5), "--rlp-ema-decay must be in [0, 1]"),
    (dict(global_batch_size=30), "--global-batch-size (30) must be a multiple of --rlp-group-size"),
    (dict(rlp_thought_length=40), "exceeds --seq-length/--max-position-embeddings (64)"),
    (dict(rlp_think_tokens=["5 6", "7"]), "--rlp-think-tokens: '5 6' is 2 tokens"),
    (dict(context_parallel_size=2), "--context-parallel-size > 1 is not supported"),
    (dict(rlp_ntp_every=1), "--rlp-ntp-every must be 0 (off) or >= 2"),
    # Position selection, RPT, the NTP term.
    (dict(rlp_positions_per_doc=0), "--rlp-positions-per-doc must be >= 1"),
    (dict(rlp_positions_per_doc=3), "--global-batch-size (32) must be a multiple of "
                                    "--rlp-group-size (16) × --rlp-positions-per-doc (3)"),
    (dict(rlp_entropy_top_fraction=0.0), "--rlp-entropy-top-fraction must be in (0, 1]"),
    (dict(rlp_entropy_threshold=2.0), "--rlp-entropy-threshold applies to --rlp-positions "
                                      "entropy"),
    (dict(rlp_positions="curriculum", rlp_curriculum_iters=0),
     "--rlp-curriculum-iters must be >= 1"),
    (dict(objective="rpt", rlp_entropy_model="teacher"), "--rlp-entropy-model teacher needs"),
    (dict(objective="rpt", rlp_rpt_match_tokens=0), "--rlp-rpt-match-tokens must be >= 1"),
    (dict(objective="rpt", rlp_rpt_match_tokens=40), "exceeds --seq-length"),
    (dict(rlp_ntp_weight=-0.1), "--rlp-ntp-weight must be a finite number >= 0"),
    (dict(rlp_ntp_weight=float("nan")), "--rlp-ntp-weight must be a finite number >= 0"),
    # What the RLP step cannot honour: refused at startup instead of failing mid-run.
    (dict(cuda_graph_impl="local"), "--cuda-graph-impl local is not supported"),
    (dict(fp8="hybrid"), "--fp8-format is not supported"),
    (dict(expert_model_parallel_size=2), "--expert-model-parallel-size 2 is not supported"),
    (dict(defer_embedding_wgrad_compute=True), "--defer-embedding-wgrad-compute is not supported"),
    # Groups that no alignment can keep whole.
    (dict(dataloader_type="cyclic"), "--dataloader-type cyclic is not supported"),
    (dict(rampup_batch_size=["8", "8", "100"]), "--rampup-batch-size 8 8 100: the start batch"),
])
def test_bad_values_name_the_flag(overrides, flag):
    with pytest.raises(SystemExit) as exc:
        arguments.validate_rlp_args(_args(**overrides))
    message = str(exc.value)
    assert message.startswith("rlp_megatron: ") and "\n" not in message
    assert flag in message


def test_rampup_in_whole_groups_and_the_sequential_sampler_pass():
    args = _args(rampup_batch_size=["16", "16", "100"], dataloader_type="single")
    assert arguments.validate_rlp_args(args) is None  # no SystemExit
    assert args.rlp_seed == 1


@pytest.mark.slow
def test_startup_fails_before_building_the_model():
    cmd = [sys.executable, "-m", "rlp_megatron.train", *TINY_GPT, *TRAIN_FLAGS,
           "--train-iters", "1", "--objective", "rlp", "--rlp-group-size", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlp_megatron: --rlp-group-size must be an integer >= 2")
    assert last.endswith("got 1")
    assert "building GPT model" not in proc.stdout and "> initializing torch distributed" not in proc.stdout


def test_prompt_file_that_is_missing_or_not_text_fails_naming_the_flag(tmp_path):
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    for path, why in ((tmp_path / "missing.txt", "cannot read"), (binary, "not UTF-8 text")):
        with pytest.raises(SystemExit, match=f"--rlp-prompt-file: .*{why}"):
            arguments.validate_rlp_args(_args(rlp_prompt_file=str(path)))
    text = tmp_path / "prompt.txt"
    text.write_text("1 2 3")
    arguments.validate_rlp_args(_args(rlp_prompt_file=str(text)))
