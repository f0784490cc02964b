"""Run `rlp_megatron.train` unchanged, recording θ before the first step and θ, φ after each step.

    torchrun --nproc-per-node N tests/workers/rlp_run.py SNAPSHOT_DIR <rlp_megatron.train flags>

Test instrumentation only: it wraps the train_step seam that rlp_megatron.train installs, so the
run itself is exactly the production path.
"""

import sys
from pathlib import Path

import rlp_megatron  # noqa: F401
import torch
from megatron.core import mpu
from megatron.training import training as mt_training

from rlp_megatron import train
from rlp_megatron.teacher import named_model_parameters


def _params(model):
    return {n: p.detach().float().clone() for n, p in named_model_parameters(model)}


def _record_rollout_communication(log: list) -> None:
    """Record every torch.distributed call made while thoughts are generated."""
    import torch.distributed as dist

    from rlp_megatron.rollout import generate as gen

    active = [False]
    # (isend/irecv are left alone: torch checks P2POp ops by identity; the rollout uses neither.)
    for name in ("send", "recv", "broadcast", "all_reduce", "all_gather",
                 "all_gather_into_tensor", "reduce_scatter_tensor"):
        original = getattr(dist, name)

        def wrapper(*a, _name=name, _original=original, **k):
            if active[0]:
                t = a[0] if a and isinstance(a[0], torch.Tensor) else None
                group = k.get("group")
                log.append({"op": _name, "shape": tuple(t.shape) if t is not None else None,
                            "dtype": str(t.dtype) if t is not None else None,
                            "group_size": dist.get_world_size(group) if group else None,
                            "src": k.get("group_src"), "dst": k.get("dst"),
                            "pp_rank": mpu.get_pipeline_model_parallel_rank()})
            return _original(*a, **k)

        setattr(dist, name, wrapper)
    original_generate = gen.generate

    def generate(*a, **k):
        active[0] = True
        try:
            return original_generate(*a, **k)
        finally:
            active[0] = False

    gen.generate = generate


def main():
    out = Path(sys.argv[1])
    argv = sys.argv[2:]
    snaps = {"theta": [], "phi": [], "flops": [], "comm": []}
    record_grads = "--record-grads" in argv
    if record_grads:
        argv.remove("--record-grads")
    if "--record-rollout-communication" in argv:
        argv.remove("--record-rollout-communication")
        _record_rollout_communication(snaps["comm"])
    original_install = train.install_hooks

    def install_hooks(args):
        run = original_install(args)
        step = mt_training.train_step

        def recording_train_step(*a, **k):
            model, optimizer = a[2], a[3]
            if not snaps["theta"]:
                snaps["theta"].append(_params(model))
            result = step(*a, **k)
            if record_grads:  # the step's reduced gradients, saved in the global layout
                from megatron.core import dist_checkpointing

                from rlp_megatron.teacher import ema_sharded_state_dict

                grads = {n: p.main_grad.detach().float().clone()
                         for n, p in named_model_parameters(model)}
                sd, _ = ema_sharded_state_dict(model, grads)
                path = out / f"grads_iter{len(snaps['theta'])}"
                if torch.distributed.get_rank() == 0:
                    path.mkdir(parents=True, exist_ok=True)
                torch.distributed.barrier()
                dist_checkpointing.save(sd, str(path))
            train.sync_params(model, optimizer, args)
            snaps["theta"].append(_params(model))
            teacher = run.rlp.teacher if run.rlp is not None else None
            snaps["phi"].append({n: t.clone() for n, t in teacher.ema.items()} if teacher else None)
            # Megatron's forward FLOPs of one sequence of each length (its own formula).
            per_seq = {n: train._per_sequence_fwd(args, n) for n in range(1, args.seq_length + 1)}
            snaps["flops"].append((mt_training.num_floating_point_operations(
                args, args.global_batch_size), per_seq))
            out.mkdir(parents=True, exist_ok=True)
            torch.save(snaps, out / f"rank{torch.distributed.get_rank()}.pt")
            return result

        mt_training.train_step = recording_train_step
        return run

    train.install_hooks = install_hooks
    train.main(argv)


if __name__ == "__main__":
    main()
