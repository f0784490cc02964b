"""Score log p(x_t | context) for fixed (context, target) pairs with weights from a checkpoint.

    torchrun --nproc-per-node N tests/workers/score_contexts.py ITER_DIR PAIRS.pt OUT.pt {theta,ema} <flags>

``theta``: the model weights of ITER_DIR (a Megatron torch_dist checkpoint). ``ema``: the EMA
teacher sidecar ITER_DIR/rlp_ema loaded into this run's layout (resharded) and swapped in.
Scoring goes through the same teacher-forward code the RLP step uses.
"""

import sys
from functools import partial

import rlp_megatron  # noqa: F401
import torch
from megatron.core import dist_checkpointing, mpu

from megatron_setup import build_model
from rlp_megatron import teacher
from rlp_megatron.data import layout_rows
from rlp_megatron.arguments import RLPConfig
from rlp_megatron.forward import forward_only, micro_batches
from rlp_megatron.step import RLPStep, _score_forward_step


def main():
    iter_dir, pairs_path, out_path, which, *flags = sys.argv[1:]
    args, model = build_model(flags)
    module = model[0].module
    state = dist_checkpointing.load({"model": module.sharded_state_dict()}, iter_dir)
    module.load_state_dict(state["model"])

    pairs = torch.load(pairs_path)
    contexts, targets = pairs["contexts"], pairs["targets"]
    rows = layout_rows(contexts, [[] for _ in contexts], [True] * len(contexts), targets,
                       think_close=0, seq_length=args.seq_length)
    mbs = 1
    batch = micro_batches(dict(tokens=rows.tokens, position_ids=rows.position_ids,
                               labels=rows.labels, target_pos=rows.target_pos), mbs)
    from megatron.training import get_tokenizer

    step = RLPStep(RLPConfig(), think=None, prompt_prefix=[], eod=0, seq_length=args.seq_length,
                   micro_batch_size=mbs, calculate_per_token_loss=False,
                   vocab_size=int(get_tokenizer().vocab_size))
    forward_step = partial(_score_forward_step, temperature=1.0, need_logp=False,
                           vocab=step.vocab(model), step=step)
    score = lambda: forward_only(model, batch, forward_step, args.seq_length, mbs)
    if which == "ema":
        ema = teacher.load_sidecar(model, iter_dir, decay=0.999)
        with ema.swapped_in():
            out = score()
    else:
        out = score()
    if mpu.is_pipeline_last_stage() and mpu.get_tensor_model_parallel_rank() == 0 \
            and mpu.get_data_parallel_rank() == 0:
        torch.save(torch.cat([o["s_target"] for o in out]), out_path)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
