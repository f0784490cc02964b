"""How exact RLP's log-probs are under --bf16, with and without the bf16 fixes, side by side.

    .venv/bin/python benchmarks/bf16_rewards.py [--groups 8]

For the tiny GPT and the tiny hybrid: one bf16 NTP iteration writes a checkpoint (so its weights
are exactly bf16 numbers); then RLPStep's rollout and scoring run in bf16 on fixed prompts, once
as shipped (fp32 logits, fp32 Mamba SSM decode state) and once with Megatron's own numerics
(bf16-rounded logits, SSM state in bf16); then an fp32 run of the *same weights* scores the same
rows. The output weight is scaled by 32 (exactly) in all runs, so logits reach a trained LM's
magnitudes (16–32). Three variants: Megatron's numerics (before), Megatron's output layer in fp32
(``--rlp-logprobs logits``) and the fused log-prob kernels (``--rlp-logprobs fused``, the
default). Printed per model and variant:

* ``head err``: logits paths: max |logit − hidden @ W.T in fp32| at the output layer (what the
  fp32 head removes: bf16 rounding of each logit); fused: max |log-prob (or decode logit) −
  float64 arithmetic on the same bf16 inputs| over every kernel call (the kernel's own error);
* ``mismatch``: rlp/logprob_mismatch, |decode − teacher-forced| log-prob of the thought tokens;
* ``S_pred err``: |S_pred(bf16 run) − S_pred(fp32 run, same weights, same rows)|, which also
  contains the bf16 rounding of every activation before the output layer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import TINY_GPT, TINY_HYBRID, TRAIN_FLAGS, torchrun  # noqa: E402

MODELS = {"gpt": TINY_GPT, "hybrid": TINY_HYBRID}


def _probe(out, mode, flags, *extra):
    torchrun(1, ["tests/workers/rollout_probe.py", str(out), mode, *flags, *TRAIN_FLAGS,
                 "--train-iters", "1", *extra])
    return torch.load(out)


def measure(root: Path, name: str, groups: int) -> list[dict]:
    flags = MODELS[name]
    init = root / f"{name}_init"
    torchrun(1, ["-m", "rlp_megatron.train", *flags, *TRAIN_FLAGS, "--train-iters", "1", "--bf16",
                 "--lr", "1e-9", "--min-lr", "1e-9", "--save", str(init), "--save-interval", "1"])
    common = ["--probe-load", str(init / "iter_0000001"), "--probe-scale-output", "32",
              "--probe-groups", str(groups)]
    rows = []
    for tag, variant, extra in (
            ("before", "Megatron bf16 logits, bf16 SSM state", ["--probe-without-bf16-fixes"]),
            ("logits", "fp32 output layer (--rlp-logprobs logits)", ["--probe-logprobs", "logits"]),
            ("fused", "fused kernels (default)", [])):
        bf16 = _probe(root / f"{name}_{tag}.pt", "rollout", flags, "--bf16", *common, *extra)
        ref = _probe(root / f"{name}_{tag}_ref.pt", "score", flags, *common,
                     "--probe-rows", str(root / f"{name}_{tag}.pt"))
        mismatch = torch.cat([(b - bf16["old_logp"][i][bf16["thought_mask"][i] > 0]).abs()
                              for i, b in enumerate(bf16["behaviour_logprobs"])])
        err = (bf16["s_pred"] - ref["s_pred"]).abs()
        rows.append(dict(model=name, variant=variant, rows=len(err),
                         max_logit=bf16["max_logit"],
                         logit_err=max(h["max_err"] for h in bf16["head"] + bf16["kernels"]),
                         mismatch_mean=mismatch.mean().item(), mismatch_max=mismatch.max().item(),
                         s_pred_mean=err.mean().item(), s_pred_max=err.max().item()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=8, help="contexts (× G = 2 thoughts each)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for name in MODELS for r in measure(Path(tmp), name, args.groups)]
    print("| model | numerics | rows | max |logit| | head err | rlp/logprob_mismatch mean / max "
          "| S_pred err vs fp32 mean / max |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['rows']} | {r['max_logit']:.1f} | "
              f"{r['logit_err']:.3g} | {r['mismatch_mean']:.3g} / {r['mismatch_max']:.3g} | "
              f"{r['s_pred_mean']:.3g} / {r['s_pred_max']:.3g} |")


if __name__ == "__main__":
    main()
