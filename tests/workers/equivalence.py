"""Worker for layout-equivalence tests: run under torchrun with Megatron flags.

    torchrun --nproc-per-node N tests/workers/equivalence.py OUT_DIR MODE <megatron flags>

MODE "reference" (TP=1, PP=1) initialises a model, saves it with dist_checkpointing to
OUT_DIR/model, then records results. Every other MODE loads OUT_DIR/model into its own layout
(resharding), then records the same results. Results: gathered logits on a fixed batch, per-token
log-probs from KV-cache decoding vs. teacher forcing, the loss of one forward/backward through
Megatron's pipeline schedule and its gradients, saved as a dist checkpoint (OUT_DIR/grads_MODE)
so that any layout reads back in the global layout.
"""

import sys
from pathlib import Path

import rlp_megatron  # noqa: F401  (CPU backend)
import torch
from megatron.core import dist_checkpointing, mpu, tensor_parallel
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.rerun_state_machine import RerunDataIterator, get_rerun_state_machine
from megatron.core.utils import get_model_config

from megatron_setup import build_model
from rlp_megatron import train
from rlp_megatron.rollout import inference as kv_decode


def fixed_batch(args, batch_size, seq_len, seed=7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 120, (batch_size, seq_len + 1), generator=g)
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(batch_size, seq_len),
        "attention_mask": mask[None, None].expand(batch_size, 1, seq_len, seq_len).contiguous(),
        "position_ids": torch.arange(seq_len)[None].expand(batch_size, seq_len).contiguous(),
    }


def gather_vocab(logits):
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def save(sharded_state_dict, path: Path):
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_state_dict, str(path))


def main():
    out_dir, mode, *flags = sys.argv[1:]
    out = Path(out_dir)
    args, model = build_model(flags)
    module = model[0].module  # inside DDP
    if mode == "reference":
        save(module.sharded_state_dict(), out / "model")
    else:
        state = dist_checkpointing.load(module.sharded_state_dict(), str(out / "model"))
        module.load_state_dict(state)
    torch.distributed.barrier()

    results = {}
    seq_len = args.seq_length
    pp = mpu.get_pipeline_model_parallel_world_size()
    if pp == 1 and not args.sequence_parallel:  # (inference needs sequence parallelism off)
        module.eval()
        batch = fixed_batch(args, 2, seq_len)
        with torch.no_grad():
            logits = module(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        results["logits"] = gather_vocab(logits).float()
        # Decode: prefill 9 tokens, then feed the remaining tokens one at a time.
        results["decode_logprobs"], results["tf_logprobs"] = kv_decode.compare_decode_to_teacher_forcing(
            module, batch["tokens"][:, :24], prefill_len=9
        )
        module.train()

    # One forward/backward through Megatron's schedule (2 micro-batches of 2).
    batches = [fixed_batch(args, 2, seq_len, seed=11 + i) for i in range(2)]
    for m in model:
        m.zero_grad_buffer()
    config = get_model_config(model[0])
    config.finalize_model_grads_func = finalize_model_grads  # as train() sets it
    data = RerunDataIterator(iter(batches))
    rerun_state_machine = get_rerun_state_machine()
    while rerun_state_machine.should_run_forward_backward(data):  # as train_step does
        losses = get_forward_backward_func()(
            forward_step_func=train.ntp_forward_step,
            data_iterator=data,
            model=model,
            num_microbatches=2,
            seq_length=seq_len,
            micro_batch_size=2,
            forward_only=False,
        )
    if mpu.is_pipeline_last_stage():
        total = sum(l["lm loss"][0] for l in losses)
        count = sum(l["lm loss"][1] for l in losses)
        results["loss"] = (total / count).item()
    # Gradients in the global (layout-independent) view: save them as a dist checkpoint.
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.main_grad)
    save(module.sharded_state_dict(), out / f"grads_{mode}")

    rank = torch.distributed.get_rank()
    if mpu.get_tensor_model_parallel_rank() == 0 and results:
        torch.save(results, out / f"{mode}_rank{rank}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
