"""Run `rlp_megatron.train` unchanged, recording θ before the first step and θ, φ after each step.

    torchrun --nproc-per-node N tests/workers/rlp_run.py SNAPSHOT_DIR <rlp_megatron.train flags>

Test instrumentation only: it wraps the train_step seam that rlp_megatron.train installs, so the
run itself is exactly the production path.
"""

import sys
from pathlib import Path

import rlp_megatron  # noqa: F401
import torch
from megatron.training import training as mt_training

from rlp_megatron import train
from rlp_megatron.teacher import named_model_parameters


def _params(model):
    return {n: p.detach().float().clone() for n, p in named_model_parameters(model)}


def main():
    out = Path(sys.argv[1])
    argv = sys.argv[2:]
    snaps = {"theta": [], "phi": [], "flops": []}
    original_install = train.install_hooks

    def install_hooks(args):
        run = original_install(args)
        step = mt_training.train_step

        def recording_train_step(*a, **k):
            model, optimizer = a[2], a[3]
            if not snaps["theta"]:
                snaps["theta"].append(_params(model))
            result = step(*a, **k)
            train.sync_params(model, optimizer, args)
            snaps["theta"].append(_params(model))
            teacher = run.rlp.teacher if run.rlp is not None else None
            snaps["phi"].append({n: t.clone() for n, t in teacher.ema.items()} if teacher else None)
            snaps["flops"].append((mt_training.num_floating_point_operations(
                args, args.global_batch_size), train._ORIG_FLOPS(args, 1)))
            out.mkdir(parents=True, exist_ok=True)
            torch.save(snaps, out / f"rank{torch.distributed.get_rank()}.pt")
            return result

        mt_training.train_step = recording_train_step
        return run

    train.install_hooks = install_hooks
    train.main(argv)


if __name__ == "__main__":
    main()
