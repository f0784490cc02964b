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


def _record_positions(log: list) -> None:
    """Before each step's position choice, the naive next-token entropies of every window:
    Megatron's own logits (output layer, TP shards gathered), softmax entropy in fp64 over the
    real vocabulary; after it, the positions chosen. PP = 1."""
    import torch.distributed as dist

    from rlp_megatron import step as step_lib

    original = step_lib.RLPStep.positions

    def positions(self, model, window_of, iteration):
        import contextlib

        windows = {g: torch.as_tensor(w).long() for g, w in window_of.items()}
        naive = {}
        swap = (self.teacher.swapped_in() if self.cfg.entropy_model == "teacher"
                else contextlib.nullcontext())
        with torch.no_grad(), swap:
            for g, w in windows.items():
                logits = model[0](w[None, :-1], torch.arange(len(w) - 1)[None], None)
                tp = mpu.get_tensor_model_parallel_group()
                parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp))]
                dist.all_gather(parts, logits.contiguous(), group=tp)
                full = torch.cat(parts, dim=-1)[0, :, : self.vocab_size].double()
                p = torch.softmax(full, dim=-1)
                naive[g] = -(p * torch.log(p)).sum(-1)  # [S]: entry j predicts w[j + 1]
        chosen = original(self, model, window_of, iteration)
        log.append({"iteration": iteration, "windows": windows, "naive_entropy": naive,
                    "chosen": chosen.by_group})
        return chosen

    step_lib.RLPStep.positions = positions


def _record_ntp_gradient(log: list) -> None:
    """The NTP term's gradient computed on its own: after the update's micro-batches are built
    (θ as the update sees it), Megatron's forward with labels over the same windows and loss
    mask, Σ CE / (tokens), backward into the gradient buffers; recorded, then cleared (the
    training step zeroes them anyway). TP = PP = DP = 1."""
    from rlp_megatron import step as step_lib

    original = step_lib.RLPStep.update_batches

    def update_batches(self, data, num_microbatches):
        batches = original(self, data, num_microbatches)
        model = self._model_for_test
        f = self.ntp_fields
        if f is None or not len(f["tokens"]):  # --rlp-ntp-weight 0, or no window here
            return batches
        for chunk in model:
            chunk.zero_grad_buffer()
        losses = model[0](f["tokens"], f["position_ids"], None, labels=f["labels"],
                          loss_mask=f["loss_mask"])
        ((losses.float() * f["loss_mask"]).sum() / f["loss_mask"].sum()).backward()
        log.append({n: p.main_grad.detach().float().clone()
                    for n, p in named_model_parameters(model)})
        for chunk in model:
            chunk.zero_grad_buffer()
        return batches

    step_lib.RLPStep.update_batches = update_batches


def main():
    out = Path(sys.argv[1])
    argv = sys.argv[2:]
    snaps = {"theta": [], "phi": [], "flops": [], "comm": [], "positions": [], "ntp_grad": []}
    if "--record-positions" in argv:
        argv.remove("--record-positions")
        _record_positions(snaps["positions"])
    record_ntp = "--record-ntp-gradient" in argv
    if record_ntp:
        argv.remove("--record-ntp-gradient")
        _record_ntp_gradient(snaps["ntp_grad"])
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
            if run.rlp is not None:
                run.rlp._model_for_test = model
            if not snaps["theta"]:
                snaps["theta"].append(_params(model))
            result = step(*a, **k)
            if record_ntp:  # the step's gradients (TP = DP = 1: already the global ones)
                snaps.setdefault("step_grads", []).append(
                    {n: p.main_grad.detach().float().clone()
                     for n, p in named_model_parameters(model)})
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
