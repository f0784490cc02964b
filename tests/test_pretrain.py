"""Megatron's real `pretrain()` through `python -m rlp_megatron.train` on CPU/gloo: tiny GPT and hybrid
(Mamba+attention+MLP) models learn, write torch_dist checkpoints, and resume from them — at another
TP size, with and without the distributed optimizer — reproducing the uninterrupted run.

Every resume reads the iteration-3 checkpoint of a 6-iteration run (``--ckpt-step 3``) and trains
iterations 4–6 again; losses come from ``--rlp-metrics-file`` (exact values, one line per
iteration), never from Megatron's console line.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import TINY_GPT, TINY_HYBRID, TRAIN_FLAGS, read_jsonl, torchrun

pytestmark = pytest.mark.slow

MODELS = {"gpt": TINY_GPT, "hybrid": TINY_HYBRID}
ITERS = 6
SAVE_AT = 3
DISTOPT = ["--use-distributed-optimizer"]
DISTOPT_RESHARDABLE = [*DISTOPT, "--dist-ckpt-optim-fully-reshardable"]
FIXES_ON = {"RLP_MEGATRON_MEGATRON_FIXES": "1"}
FIXES_OFF = {"RLP_MEGATRON_MEGATRON_FIXES": "0"}
_ITER_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)")


@dataclass
class TrainRun:
    returncode: int
    output: str
    records: list[dict]

    @property
    def losses(self) -> dict[int, float]:
        return {r["iteration"]: r["lm loss"] for r in self.records}

    def steady_iteration_ms(self) -> float | None:
        """Median console 'elapsed time per iteration' from the third logged iteration on (the
        first logged iteration of a process includes start-up and is averaged into the second)."""
        times = [float(ms) for _, ms in _ITER_LINE.findall(self.output)][2:]
        return statistics.median(times) if times else None


def _train(out: Path, name: str, nproc: int, model: str, *extra: str, env=None,
           check: bool = True) -> TrainRun:
    metrics = out / f"{name}.jsonl"
    proc = torchrun(nproc, ["-m", "rlp_megatron.train", *MODELS[model], *TRAIN_FLAGS,
                            "--train-iters", str(ITERS), "--rlp-metrics-file", str(metrics), *extra],
                    env={**FIXES_ON, **(env or {})}, check=check)
    records = read_jsonl(metrics) if metrics.exists() else []
    return TrainRun(proc.returncode, proc.stdout + proc.stderr, records)


def _save_flags(ckpt: Path) -> list[str]:
    return ["--save", str(ckpt), "--save-interval", str(SAVE_AT)]


def _resume_flags(ckpt: Path) -> list[str]:
    return ["--load", str(ckpt), "--ckpt-step", str(SAVE_AT)]


def _max_rel_diff(reference: TrainRun, resumed: TrainRun) -> float:
    assert sorted(resumed.losses) == list(range(SAVE_AT + 1, ITERS + 1)), (
        f"resumed run logged iterations {sorted(resumed.losses)}, expected it to continue from "
        f"{SAVE_AT}")
    ref = reference.losses
    return max(abs(loss - ref[i]) / abs(ref[i]) for i, loss in resumed.losses.items())


def _curve(run: TrainRun) -> str:
    return " ".join(f"{i}:{v:.6f}" for i, v in sorted(run.losses.items()))


# --------------------------------------------------------------------------------------------
# Runs (module-scoped: each is shared by the assertions that need it)


@pytest.fixture(scope="module", params=sorted(MODELS))
def tp1_run(request, tmp_path_factory):
    """6 iterations at TP=1 (plain Megatron optimizer), saving at 3 and 6."""
    out = tmp_path_factory.mktemp(f"pretrain_{request.param}")
    ckpt = out / "ckpt"
    run = _train(out, "tp1", 1, request.param, *_save_flags(ckpt))
    return request.param, out, ckpt, run


@pytest.fixture(scope="module")
def tp2_resume(tp1_run):
    model, out, ckpt, _ = tp1_run
    return _train(out, "resume_tp2", 2, model, *_resume_flags(ckpt),
                  "--tensor-model-parallel-size", "2")


@pytest.fixture(scope="module")
def distopt_tp2_run(tmp_path_factory):
    """GPT, TP=2, distributed optimizer, fully reshardable optimizer checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("distopt_tp2")
    ckpt = out / "ckpt"
    run = _train(out, "tp2", 2, "gpt", *DISTOPT_RESHARDABLE, "--tensor-model-parallel-size", "2",
                 *_save_flags(ckpt))
    return out, ckpt, run


@pytest.fixture(scope="module")
def distopt_tp1_run(tmp_path_factory):
    """GPT, TP=1, distributed optimizer, default (dp_reshardable) optimizer checkpoints."""
    out = tmp_path_factory.mktemp("distopt_tp1")
    ckpt = out / "ckpt"
    run = _train(out, "tp1", 1, "gpt", *DISTOPT, *_save_flags(ckpt))
    return out, ckpt, run


# --------------------------------------------------------------------------------------------
# Learning and checkpointing


def test_lm_loss_decreases_on_mock_data(tp1_run):
    model, _, _, run = tp1_run
    losses = run.losses
    print(f"{model} TP=1 lm loss {_curve(run)}; steady iteration {run.steady_iteration_ms()} ms")
    assert sorted(losses) == list(range(1, ITERS + 1))
    values = [losses[i] for i in sorted(losses)]
    assert 4.0 < values[0] < 5.5  # ≈ ln(128) = 4.85 at initialisation
    assert all(b < a for a, b in zip(values, values[1:])), values
    assert values[-1] < values[0] - 0.3, values


def test_torch_dist_checkpoint_is_written(tp1_run):
    _, _, ckpt, _ = tp1_run
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    for iteration in (SAVE_AT, ITERS):
        step_dir = ckpt / f"iter_{iteration:07d}"
        assert step_dir.is_dir()
        assert '"sharded_backend": "torch_dist"' in (step_dir / "metadata.json").read_text()
        assert list(step_dir.glob("*.distcp"))


def test_resume_at_tp2_continues_the_tp1_run(tp1_run, tp2_resume):
    model, _, ckpt, reference = tp1_run
    assert f"successfully loaded checkpoint from {ckpt}" in tp2_resume.output
    diff = _max_rel_diff(reference, tp2_resume)
    print(f"{model} TP=1 → TP=2 resume: {_curve(tp2_resume)}; max rel diff {diff:.3g}")
    assert diff <= 1e-6


# --------------------------------------------------------------------------------------------
# Distributed optimizer resume (and the megatron_fixes it needs)


def test_distopt_resume_tp2_to_tp1_is_exact(distopt_tp2_run):
    out, ckpt, reference = distopt_tp2_run
    print(f"GPT TP=2 distopt uninterrupted: {_curve(reference)}; "
          f"steady iteration {reference.steady_iteration_ms()} ms")
    resumed = _train(out, "resume_tp1", 1, "gpt", *DISTOPT_RESHARDABLE, *_resume_flags(ckpt))
    assert f"successfully loaded checkpoint from {ckpt}" in resumed.output
    diff = _max_rel_diff(reference, resumed)
    print(f"GPT TP=2 → TP=1 distopt resume: {_curve(resumed)}; max rel diff {diff:.3g}")
    assert diff <= 1e-6


def test_distopt_resume_needs_megatron_fixes(distopt_tp2_run):
    """Without rlp_megatron.megatron_fixes the same resume crashes in DistributedOptimizer (torch
    Adam has no state yet when the loader builds its template) or, if it gets through, diverges."""
    out, ckpt, reference = distopt_tp2_run
    resumed = _train(out, "resume_tp1_nofix", 1, "gpt", *DISTOPT_RESHARDABLE, *_resume_flags(ckpt),
                     env=FIXES_OFF, check=False)
    if resumed.returncode != 0:
        tail = resumed.output[-4000:]
        assert "distrib_optimizer.py" in tail and ("AssertionError" in tail or "KeyError" in tail), tail
        print("without megatron_fixes: crashed in DistributedOptimizer as expected")
    else:
        diff = _max_rel_diff(reference, resumed)
        print(f"without megatron_fixes: resumed but diverged, max rel diff {diff:.3g}")
        assert diff > 1e-6


def test_distopt_same_tp_resume_dp_reshardable_is_exact(distopt_tp1_run):
    out, ckpt, reference = distopt_tp1_run
    resumed = _train(out, "resume_tp1", 1, "gpt", *DISTOPT, *_resume_flags(ckpt))
    assert f"successfully loaded checkpoint from {ckpt}" in resumed.output
    _max_rel_diff(reference, resumed)  # iterations continue 4..6
    print(f"GPT TP=1 distopt dp_reshardable resume: {_curve(resumed)}")
    assert resumed.losses == {i: reference.losses[i] for i in resumed.losses}
