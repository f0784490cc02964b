"""Entry point: Megatron-LM pretraining with a switchable objective (`--objective {ntp,rlp}`).

This is the one module that talks to ``megatron.training``. It takes every flag of Megatron-LM's
``pretrain_gpt.py`` (or ``pretrain_hybrid.py`` when ``--hybrid-layer-pattern`` is given) plus one
``--rlp-*`` argument group, and calls Megatron's own ``pretrain()`` with our ``forward_step``.

    torchrun --nproc-per-node 8 -m rlp_megatron.train <Megatron flags> --objective ntp
"""

from __future__ import annotations

import dataclasses
import sys
from functools import partial

import rlp_megatron  # noqa: F401  (enables the CPU backend when there is no GPU)
import torch
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
from megatron.training import get_args, get_timers, pretrain, print_rank_0
from megatron.training.argument_utils import (
    gpt_config_from_args,
    hybrid_config_from_args,
    pretrain_cfg_container_from_args,
)
from megatron.training.arguments import parse_and_validate_args
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

from rlp_megatron import arguments as rlp_arguments
from rlp_megatron.backends import cpu as cpu_backend
from rlp_megatron import megatron_fixes

_BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


# ---------------------------------------------------------------------------------------------
# Data


def gpt_dataset_config(args) -> GPTDatasetConfig:
    """GPTDatasetConfig from Megatron flags (pretrain_gpt.py's, restricted to fields this
    megatron-core version knows)."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    values = dict(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        multiple_validation_sets=getattr(args, "multiple_validation_sets", None),
        full_validation=getattr(args, "full_validation", None),
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=build_tokenizer(args),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        object_storage_cache_path=getattr(args, "object_storage_cache_path", None),
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=getattr(args, "allow_ambiguous_pad_tokens", False),
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel,
    )
    known = {f.name for f in dataclasses.fields(GPTDatasetConfig) if f.init}
    return GPTDatasetConfig(**{k: v for k, v in values.items() if k in known})


def _dataset_built_on_rank(vp_stage=None):
    return mpu.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPT datasets (indexed .bin/.idx, or --mock-data)."""
    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building train, validation, and test datasets ...")
    return BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        partial(_dataset_built_on_rank, vp_stage=vp_stage),
        gpt_dataset_config(args),
    ).build()


train_valid_test_datasets_provider.is_distributed = True


# ---------------------------------------------------------------------------------------------
# NTP step (Megatron's pretrain_gpt/pretrain_hybrid forward_step, without SFT/packing)


def get_ntp_batch(data_iterator, vp_stage=None):
    args = get_args()
    if not is_first_or_last_pipeline_stage(vp_stage):
        return {key: None for key in _BATCH_KEYS}
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        batch = next(data_iterator)
        batch = {k: (v.cuda(non_blocking=True) if v is not None else None) for k, v in batch.items()}
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    if args.context_parallel_size > 1:
        batch = get_batch_on_this_cp_rank(
            batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group()
        )
    return {key: batch.get(key) for key in _BATCH_KEYS}


def ntp_loss_func(loss_mask, output_tensor):
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


def ntp_forward_step(data_iterator, model, return_schedule_plan: bool = False):
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_ntp_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    timers("batch-generator").stop()
    output_tensor = model(
        batch["tokens"],
        batch["position_ids"],
        batch["attention_mask"],
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output_tensor, partial(ntp_loss_func, batch["loss_mask"])


# ---------------------------------------------------------------------------------------------
# Entry point


def is_hybrid(args) -> bool:
    return bool(getattr(args, "hybrid_layer_pattern", None) or getattr(args, "hybrid_override_pattern", None))


def model_config_from_args(args):
    if is_hybrid(args):
        if args.spec is None and args.transformer_impl == "local":
            from rlp_megatron.specs import hybrid_local_stack_spec

            cfg = hybrid_config_from_args(args)
            cfg.hybrid_stack_spec = hybrid_local_stack_spec
            return cfg
        return hybrid_config_from_args(args)
    return gpt_config_from_args(args)


def parse_args(argv=None):
    """Megatron's parser + our `--objective` / `--rlp-*` group, validated before any model exists."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = parse_and_validate_args(
        extra_args_provider=rlp_arguments.add_rlp_args,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )
    cpu_backend.check_cpu_args(args)
    rlp_arguments.validate_rlp_args(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    megatron_fixes.install()
    full_config = pretrain_cfg_container_from_args(args, model_config_from_args(args))
    pretrain(
        full_config,
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        ntp_forward_step,
    )


if __name__ == "__main__":
    main()
