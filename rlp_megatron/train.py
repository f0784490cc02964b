"""Entry point: Megatron-LM pretraining with a switchable objective (`--objective {ntp,rlp}`).

This is the one module that talks to ``megatron.training``. It takes every flag of Megatron-LM's
``pretrain_gpt.py`` (or ``pretrain_hybrid.py`` when ``--hybrid-layer-pattern`` is given) plus one
``--rlp-*`` argument group, and calls Megatron's own ``pretrain()``.

    torchrun --nproc-per-node 8 -m rlp_megatron.train <Megatron flags> --objective rlp

Megatron-LM's ``train()`` has no hook API, so the seams are module-level functions of
``megatron.training.training`` that ``train()`` looks up at call time (installed by
:func:`install_hooks`, nothing else is changed):

* ``train_step``: an RLP iteration runs :class:`rlp_megatron.step.RLPStep` (positions, rollout,
  scoring) and then Megatron's own ``train_step`` on the rollout's micro-batches; after every
  optimizer step that was not skipped the EMA teacher is updated. RLP metrics join the loss dict,
  so Megatron prints them in its iteration line and writes them to TensorBoard/W&B.
* ``num_floating_point_operations``: Megatron's FLOP count assumes NTP over ``--seq-length``; for
  RLP steps it is replaced by the FLOPs actually run (rollout + scoring + teacher + update), so
  ``--log-throughput`` and the FLOPs in checkpoints stay truthful.
* ``training_log``: the console line averages each metric over the iterations that logged it
  (RLP and NTP keys alternate under ``--rlp-ntp-every``) and shows negative ones (log-probs),
  which Megatron leaves out.
* ``save_checkpoint`` / ``load_checkpoint``: the EMA teacher travels with each checkpoint as a
  dist-checkpointing sidecar ``iter_XXXXXXX/rlp_ema/`` (see :mod:`rlp_megatron.teacher` for the
  crash-safety rule), and is resharded on load like the model.

Switching objectives on one checkpoint directory (the users' workflow):

* NTP → RLP: ``--objective rlp --load DIR`` continues the iteration counter; optimizer state, LR
  schedule and RNG follow Megatron's own flags; the teacher starts as φ ← θ (loaded weights).
* RLP → RLP (resume): φ is loaded from the sidecar; a missing sidecar warns and re-initialises
  φ ← θ; an incomplete or mismatched one is an error naming its path (``--rlp-ema-reinit``
  overrides).
* RLP → NTP: ``--objective ntp --load DIR`` ignores the sidecar; NTP runs hold no teacher and
  their checkpoints carry no sidecar (a stale φ would silently mislead a later RLP run, which
  instead starts φ ← θ from the weights it resumes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from functools import partial

import rlp_megatron  # noqa: F401  (enables the CPU backend when there is no GPU)
import torch
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.utils import (
    get_attr_wrapped_model,
    get_batch_on_this_cp_rank,
    get_batch_on_this_tp_rank,
)
from megatron.training import checkpointing as mt_checkpointing
from megatron.training import get_args, get_timers, pretrain, print_rank_0
from megatron.training import training as mt_training
from megatron.training.argument_utils import (
    gpt_config_from_args,
    hybrid_config_from_args,
    pretrain_cfg_container_from_args,
)
from megatron.training.arguments import parse_and_validate_args
from megatron.training.global_vars import get_tokenizer
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

from rlp_megatron import arguments as rlp_arguments
from rlp_megatron import evaluation, faults, megatron_fixes, storage
from rlp_megatron import teacher as teacher_lib
from rlp_megatron.backends import cpu as cpu_backend
from rlp_megatron.data import (RLPDataset, check_indexed_dataset, load_prompt_tokens,
                               resolve_think_tokens)
from rlp_megatron.logprobs import fp32_output_layer
from rlp_megatron.step import RLPStep, StepData, variable_seq_lengths
from rlp_megatron.teacher import EMATeacher

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


def _check_data_files(args) -> None:
    """Every .bin/.idx pair of the blend is whole (see data.check_indexed_dataset): one line
    naming the file now, not a failed read hours into the run."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    blends = [blend] if blend is not None else list(blend_per_split or [])
    for b in blends:
        for prefix in (b[0] if b else []):
            try:
                check_indexed_dataset(prefix)
            except ValueError as exc:
                raise SystemExit(f"rlp_megatron: {exc}") from None


def _dataset_built_on_rank(vp_stage=None):
    return mpu.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPT datasets (indexed .bin/.idx, or --mock-data); for RLP the training split
    is wrapped so that each sample also carries its global index (see rlp_megatron.data)."""
    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    if not args.mock_data:
        _check_data_files(args)
    print_rank_0("> building train, validation, and test datasets ...")
    if args.rlp_eval_interval:  # the held-out positions come from the validation split
        train_val_test_num_samples = list(train_val_test_num_samples)
        train_val_test_num_samples[1] = max(train_val_test_num_samples[1] or 0,
                                            args.rlp_eval_positions)
    train, valid, test = BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        partial(_dataset_built_on_rank, vp_stage=vp_stage),
        gpt_dataset_config(args),
    ).build()
    if args.objective != "ntp" and train is not None:
        train = RLPDataset(train, args.rlp_group_size, args.rlp_positions_per_doc)
    if _RUN is not None:
        _RUN.eval_dataset = valid
    return train, valid, test


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
# The training-loop seams


class Run:
    """Per-process state of a run: which objective each iteration uses, the RLP step, metrics."""

    def __init__(self, args):
        self.args = args
        self.rlp: RLPStep | None = None
        self.last_step_flops: float | None = None
        self.skipped_steps = 0  # RLP steps skipped for non-finite rewards (rlp/skipped_steps)
        self.consecutive_skips = 0
        self.metrics_file = args.rlp_metrics_file
        self.eval_dataset = None  # Megatron's validation split (rlp_megatron.evaluation)
        if args.objective != "ntp" or args.rlp_eval_interval:  # rlp, rpt, or evaluations
            tokenizer = get_tokenizer()
            self.rlp = RLPStep(
                rlp_arguments.RLPConfig.from_args(args),
                think=resolve_think_tokens(tokenizer, args.rlp_think_tokens),
                prompt_prefix=load_prompt_tokens(tokenizer, args.rlp_prompt_file),
                eod=int(tokenizer.eod),
                seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size,
                calculate_per_token_loss=args.calculate_per_token_loss,
                vocab_size=int(tokenizer.vocab_size),
                check_nan=args.check_for_nan_in_loss_and_grad,
            )
        self.loaded_iteration_dir: str | None = None

    def objective_for(self, iteration: int) -> str:
        """Objective of the step that produces iteration ``iteration + 1``."""
        k = self.args.rlp_ntp_every
        if self.args.objective != "ntp" and k and (iteration + 1) % k == 0:
            return "ntp"
        return self.args.objective

    def ensure_teacher(self, model) -> None:
        """φ at the first step of an RLP run: from the resumed checkpoint's sidecar, else φ ← θ."""
        if self.rlp is None or self.rlp.teacher is not None or not self.rlp.needs_teacher:
            return
        decay = self.rlp.cfg.ema_decay
        where = self.loaded_iteration_dir
        state = teacher_lib.sidecar_state(where) if where else "missing"
        if where and self.args.rlp_ema_reinit:
            print_rank_0(f"rlp_megatron: --rlp-ema-reinit: EMA teacher starts as φ ← θ "
                         f"(ignoring {teacher_lib.sidecar_path(where)})")
        elif state == "valid":
            try:
                self.rlp.teacher = teacher_lib.load_sidecar(model, where, decay)
            except teacher_lib.SidecarError as exc:
                raise SystemExit(f"rlp_megatron: {exc}; pass --rlp-ema-reinit to start φ ← θ")
            print_rank_0(f"rlp_megatron: loaded EMA teacher from {teacher_lib.sidecar_path(where)}")
            return
        elif state == "incomplete":
            raise SystemExit(f"rlp_megatron: EMA teacher sidecar {teacher_lib.sidecar_path(where)} "
                             f"is incomplete (interrupted save); pass --rlp-ema-reinit to start φ ← θ")
        elif where and _saved_objective(where) == "rlp":
            print_rank_0(f"rlp_megatron: WARNING: RLP checkpoint {where} has no EMA teacher "
                         f"sidecar ({teacher_lib.SIDECAR_DIR}/); starting φ ← θ from its weights")
        elif where:
            print_rank_0(f"rlp_megatron: switching to RLP from the {_saved_objective(where).upper()} "
                         f"checkpoint {where}: EMA teacher starts as φ ← θ (the loaded weights)")
        self.rlp.teacher = EMATeacher(model, decay)

    def write_metrics(self, iteration: int, objective: str, loss_reduced: dict) -> None:
        if not self.metrics_file or torch.distributed.get_rank() != torch.distributed.get_world_size() - 1:
            return
        record = {"iteration": iteration, "objective": objective}
        record.update({k: float(v) for k, v in loss_reduced.items()})
        os.makedirs(os.path.dirname(os.path.abspath(self.metrics_file)), exist_ok=True)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")


_RUN: Run | None = None


def _saved_objective(iteration_dir) -> str:
    """The --objective a checkpoint was saved with (checkpoints from plain Megatron: ntp)."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    try:
        saved = load_common_state_dict(iteration_dir).get("args")
    except Exception:  # unreadable common state: the model load already succeeded, so be lenient
        return "unknown"
    return getattr(saved, "objective", "ntp")


def sync_params(model, optimizer, args) -> None:
    """Make the model's parameters current after an optimizer step: with the distributed
    optimizer and --overlap-param-gather they are otherwise all-gathered in the next forward."""
    if mt_training.should_disable_forward_pre_hook(args):
        mt_training.force_param_sync(model, optimizer)


def _rlp_iteration(run: Run, orig_train_step, data_iterator, model, optimizer, scheduler, config,
                   forward_backward_func, iteration, kwargs):
    # Fused log-probs never call the output layer; the logits path runs it in fp32.
    with fp32_output_layer(model) if not run.rlp.fused else contextlib.nullcontext():
        return _rlp_phases(run, orig_train_step, data_iterator, model, optimizer, scheduler,
                           config, forward_backward_func, iteration, kwargs)


def _rlp_phases(run: Run, orig_train_step, data_iterator, model, optimizer, scheduler, config,
                forward_backward_func, iteration, kwargs):
    args = get_args()
    step = run.rlp
    num_mb = get_num_microbatches()
    t0 = time.perf_counter()
    work, samples = step.pull_samples(model, data_iterator, num_mb, iteration + 1)
    generated, rollout = step.rollout(model, work, iteration, step.owner)
    t1 = time.perf_counter()
    data = StepData(samples=samples, rollout=rollout, generated=generated,
                    iteration=iteration + 1)
    step.layout(data)
    step.score_teacher(model, data)
    if mpu.is_pipeline_last_stage():
        step.advantages(data)
    if not _rewards_finite(data):
        # The rollout and the teacher ran: their FLOPs count, the update's do not exist.
        run.last_step_flops = _step_totals(args, step, data, generated, update=[])[2]
        return _skip_step(run, args, data, iteration)
    run.consecutive_skips = 0
    data.metrics["rlp/skipped_steps"] = float(run.skipped_steps)
    t2 = time.perf_counter()
    batches = step.update_batches(data, num_mb)
    # Micro-batches of different widths (variable_seq_lengths: PP exchanges their shapes);
    # --seq-length set to the widest, for anything that still reads it.
    with _seq_length(args, data.length), variable_seq_lengths(model):
        out = orig_train_step(step.forward_step, batches, model, optimizer, scheduler, config,
                              _with_microbatches(forward_backward_func, step.num_microbatches),
                              iteration=iteration, **kwargs)
    if mpu.is_pipeline_last_stage():
        step.finish_update(data)
    t3 = time.perf_counter()
    if args.rlp_dump_rollouts:
        _dump_rollout(args.rlp_dump_rollouts, iteration + 1, data)
    thoughts, gen_tokens, flops = _step_totals(args, step, data, generated, data.update_widths)
    data.metrics.update({
        "rlp/flops": flops,
        "rlp/thoughts_per_s": thoughts / (t1 - t0),
        "rlp/gen_tokens_per_s": gen_tokens / (t1 - t0),
        "rlp/time_rollout_s": t1 - t0,
        "rlp/time_teacher_s": t2 - t1,
        "rlp/time_update_s": t3 - t2,
    })
    run.last_step_flops = flops
    return out, data.metrics


def _with_microbatches(forward_backward_func, num_microbatches: int):
    """Megatron's forward_backward_func running ``num_microbatches`` (the NTP term adds
    micro-batches to the step; Megatron's own count still drives its LR schedule)."""
    def run(**kwargs):
        kwargs["num_microbatches"] = num_microbatches
        return forward_backward_func(**kwargs)

    return run


def _step_totals(args, step: RLPStep, data: StepData, generated, update) -> list[float]:
    """Thoughts generated, tokens sampled and FLOPs run by the step, summed over DP ranks."""
    flops = _rlp_flops(args, update=update, teacher=data.teacher_widths,
                       fed_tokens=generated.fed_tokens, logit_rows=generated.logit_rows,
                       fused=step.fused, entropy=step.entropy_widths,
                       ntp=data.ntp_widths if update else [])
    totals = torch.tensor([len(generated.rows), generated.generated_tokens, flops],
                          dtype=torch.float64).cuda()
    torch.distributed.all_reduce(totals, group=mpu.get_data_parallel_group())
    return totals.tolist()


def _rewards_finite(data: StepData) -> bool:
    """The last stage's verdict on the global batch's rewards, on every pipeline stage."""
    flag = torch.tensor([0.0 if data.finite_rewards else 1.0]).cuda()
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                     group=mpu.get_pipeline_model_parallel_group())
    return flag.item() == 0.0


def _skip_step(run: Run, args, data: StepData, iteration: int):
    """A step with non-finite rewards: no update, no EMA update, counted; the data it read is
    consumed (Megatron advances the sample counter for skipped iterations too). Megatron's own
    NaN handling (the rerun state machine on the loss) stays for a non-finite loss with finite
    rewards: that is the model's forward diverging, which skipping a step would not cure."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    run.consecutive_skips += 1
    run.skipped_steps += 1
    print_rank_0(f"rlp_megatron: iteration {iteration + 1}: non-finite reward (S_pred or S_EMA); "
                 f"step skipped ({run.consecutive_skips} in a row, {run.skipped_steps} in all)")
    if run.consecutive_skips >= args.rlp_max_skipped:
        raise SystemExit(f"rlp_megatron: {run.consecutive_skips} consecutive RLP steps had "
                         f"non-finite rewards (--rlp-max-skipped {args.rlp_max_skipped}); "
                         f"stopping at iteration {iteration + 1}")
    should_checkpoint, should_exit, exit_code = (
        get_rerun_state_machine().should_checkpoint_and_exit())
    out = ({}, 1, should_checkpoint, should_exit, exit_code, None, None, 0)
    return out, {"rlp/skipped_steps": float(run.skipped_steps)}


@contextlib.contextmanager
def _seq_length(args, length: int):
    saved = args.seq_length
    args.seq_length = length
    try:
        yield
    finally:
        args.seq_length = saved


def _per_sequence_fwd(args, length: int) -> float:
    """Megatron's forward FLOPs of one sequence of ``length`` tokens (its formula: fwd+bwd = 3×)."""
    with _seq_length(args, length):
        return _ORIG_FLOPS(args, 1) / 3.0


def _rlp_flops(args, *, update: list[tuple[int, int]], teacher: list[tuple[int, int]],
               fed_tokens: int, logit_rows: int, fused: bool,
               entropy: list[tuple[int, int]] = (), ntp: list[tuple[int, int]] = ()) -> float:
    """FLOPs this rank ran for one RLP step, with Megatron's own per-sequence formula at the
    widths actually computed, split into the model body and the output projection (2·h·V per
    position and forward) so that each counts where it ran:

    * body: the update (fwd+bwd = 3 fwd), the teacher forward and the entropy forward of
      position selection, each micro-batch's rows at its width (``update`` / ``teacher`` /
      ``entropy``: (rows, width) per micro-batch), and the rollout's forwards (every token fed;
      per token as in a --seq-length sequence);
    * the NTP term's windows (``--rlp-ntp-weight``, ``ntp``): Megatron's own formula, fwd+bwd,
      output layer included (they run Megatron's loss path);
    * output projection: the update over every position — fused, 4× (forward, the backward's
      recomputation, and the two gradient GEMMs) instead of Megatron's 3×, plus S_pred's position
      once per row —, the teacher at the one scored position per context and the rollout at the
      positions whose logits it computed (the last of each forward), the entropy forward at
      every position; through Megatron's output layer (``--rlp-logprobs logits``) at every
      position of every forward.
    """
    logit = 2.0 * args.hidden_size * args.padded_vocab_size
    per_token = _per_sequence_fwd(args, args.seq_length) / args.seq_length
    fwd = {w: _per_sequence_fwd(args, w) for _, w in [*update, *teacher, *entropy, *ntp]}
    megatron = sum(3 * n * fwd[w] for n, w in ntp)
    if not fused:
        return (sum(3 * n * fwd[w] for n, w in update)
                + sum(n * fwd[w] for n, w in [*teacher, *entropy])
                + per_token * fed_tokens + megatron)
    rows, contexts = sum(n for n, _ in update), sum(n for n, _ in teacher)
    body = (sum(3 * n * (fwd[w] - logit * w) for n, w in update)
            + sum(n * (fwd[w] - logit * w) for n, w in [*teacher, *entropy])
            + (per_token - logit) * fed_tokens)
    return (body + megatron + logit * (4 * sum(n * w for n, w in update) + rows + contexts
                                       + logit_rows + sum(n * w for n, w in entropy)))


def _dump_rollout(directory, iteration, data: StepData):
    if mpu.get_tensor_model_parallel_rank() != 0 or not mpu.is_pipeline_last_stage():
        return
    os.makedirs(directory, exist_ok=True)
    r, g = data.rollout, data.generated
    torch.save({
        "iteration": iteration, "rows": r.rows, "groups": r.groups, "thoughts": r.thoughts,
        "closed": r.closed, "behaviour_logprobs": r.behaviour_logprobs,
        "prompts": [data.samples[g].prompt for g in r.groups],
        "targets": [data.samples[g].target for g in r.groups],
        "s_pred": data.s_pred, "s_ema": data.s_ema, "advantages": data.advantages,
        "rewards": data.rewards, "positions": [data.samples[g].position for g in r.groups],
        "generated_rows": g.rows, "predicted": g.predicted,
        "old_logp": data.old_logp, "thought_mask": data.thought_mask,
        # The work this rank ran: the rollout of the groups it owns, the teacher on their contexts.
        "fed_tokens": g.fed_tokens,
        "decode_steps": g.decode_steps,
        "logit_rows": g.logit_rows,
        "rollout_groups": sorted(set(g.groups)),
        "teacher_groups": data.teacher_groups,
        "update_widths": data.update_widths,  # (rows, width) per micro-batch
        "teacher_widths": data.teacher_widths,
    }, os.path.join(directory, f"iter{iteration:07d}_dp{mpu.get_data_parallel_rank()}.pt"))


def _train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
                forward_backward_func, iteration=None, **kwargs):
    run, args = _RUN, get_args()
    run.ensure_teacher(model)
    objective = run.objective_for(iteration)
    run.last_step_flops = None
    extra = {}
    if objective != "ntp":  # rlp, rpt
        out, extra = _rlp_iteration(run, _ORIG_TRAIN_STEP, data_iterator, model, optimizer,
                                    opt_param_scheduler, config, forward_backward_func, iteration,
                                    kwargs)
    else:
        out = _ORIG_TRAIN_STEP(ntp_forward_step, data_iterator, model, optimizer,
                               opt_param_scheduler, config, forward_backward_func,
                               iteration=iteration, **kwargs)
    loss_reduced, skipped_iter = out[0], out[1]
    teacher = run.rlp.teacher if run.rlp is not None else None
    if teacher is not None and not skipped_iter:
        sync_params(model, optimizer, args)
        teacher.update()
    if args.rlp_eval_interval and (iteration + 1) % args.rlp_eval_interval == 0:
        scores = evaluation.evaluate(run.rlp, model, run.eval_dataset, args.rlp_eval_positions)
        extra = {**extra, **(scores or {})}
    if loss_reduced or mpu.is_pipeline_last_stage():
        loss_reduced = dict(loss_reduced)
        loss_reduced.update({k: torch.tensor(v).cuda() for k, v in extra.items()})
        run.write_metrics(iteration + 1, objective, loss_reduced)
        out = (loss_reduced, *out[1:])
    return out


def _num_floating_point_operations(args, batch_size, *a, **kw):
    if _RUN is not None and _RUN.last_step_flops is not None:
        return _RUN.last_step_flops
    return _ORIG_FLOPS(args, batch_size, *a, **kw)


_CONSOLE_SUMS: dict[str, list] = {}  # key -> [sum, iterations that logged it]
_CONSOLE_KEYS: set[str] = set()  # every key logged so far (Megatron keeps printing them all)


def _training_log(loss_dict, total_loss_dict, *args, **kwargs):
    """Megatron's training_log with two corrections to the console line; TensorBoard and W&B
    still get every key of every iteration from Megatron itself.

    * Each key is averaged over the iterations that logged it. Megatron divides each key's sum
      by every iteration of the log interval; with ``--rlp-ntp-every`` the RLP keys and
      ``lm loss`` each appear in only some of them.
    * Negative averages (log-probs such as ``rlp/s_pred``) are printed too; Megatron prints only
      non-negative ones.
    * A key that no iteration of the interval logged is left out; Megatron prints it as 0 (the
      ``rlp_eval/*`` of the iterations between two evaluations).
    The sums reset when Megatron resets its own (after each printed line but the first)."""
    margs = get_args()
    iteration = kwargs["iteration"] if "iteration" in kwargs else args[1]
    skipped = kwargs["skipped_iter"] if "skipped_iter" in kwargs else args[4]
    is_first = kwargs.get("is_first_iteration", False)
    if not skipped:
        for key, value in loss_dict.items():
            acc = _CONSOLE_SUMS.setdefault(key, [0.0, 0])
            acc[0] += float(value)
            acc[1] += 1
            _CONSOLE_KEYS.add(key)
    if not (iteration % margs.log_interval == 0 or is_first):
        return _ORIG_TRAINING_LOG(loss_dict, total_loss_dict, *args, **kwargs)
    averages = {k: total / n for k, (total, n) in _CONSOLE_SUMS.items() if n}
    orig_print = mt_training.print_rank_last

    def print_rank_last(message):
        if " iteration " in message and " loss scale:" in message:
            message = _console_line(message, averages, _CONSOLE_KEYS - set(averages))
        orig_print(message)

    mt_training.print_rank_last = print_rank_last
    try:
        return _ORIG_TRAINING_LOG(loss_dict, total_loss_dict, *args, **kwargs)
    finally:
        mt_training.print_rank_last = orig_print
        if not is_first:
            _CONSOLE_SUMS.clear()


def _console_line(message: str, averages: dict[str, float], absent=()) -> str:
    """Megatron's iteration line with ``key: value |`` set to ``averages`` for every key, and
    without the fields of the ``absent`` keys."""
    for key in absent:
        message = re.sub(rf" {re.escape(key)}: [^|]* \|", "", message, count=1)
    for key, avg in averages.items():
        field = f" {key}: {avg:.6E} |"
        pattern = re.compile(rf" {re.escape(key)}: [^|]* \|")
        if pattern.search(message):
            message = pattern.sub(lambda _: field, message, count=1)
        else:
            message = message.replace(" loss scale:", field + " loss scale:", 1)
    return message


def _save_checkpoint(iteration, model, optimizer, opt_param_scheduler, *args, **kwargs):
    """Megatron's save_checkpoint, preceded by the EMA sidecar of the same iteration; a storage
    failure stops the job with one line (``rlp_megatron.storage``)."""
    margs = get_args()
    try:
        return _save_checkpoint_and_sidecar(margs, iteration, model, optimizer,
                                            opt_param_scheduler, *args, **kwargs)
    except BaseException as exc:  # torch DCP's CheckpointException is not an Exception
        line = (None if isinstance(exc, (SystemExit, KeyboardInterrupt))
                else storage.describe_save_failure(exc, margs.save, iteration))
        if line is None:
            raise
        raise SystemExit(line) from exc


def _save_checkpoint_and_sidecar(margs, iteration, model, optimizer, opt_param_scheduler, *args,
                                 **kwargs):
    teacher = _RUN.rlp.teacher if _RUN is not None and _RUN.rlp is not None else None
    persistent = not kwargs.get("non_persistent_ckpt", False)
    if teacher is not None and margs.save and persistent and margs.ckpt_format == "torch_dist":
        iteration_dir = mt_checkpointing.get_checkpoint_name(margs.save, iteration,
                                                             return_base_dir=True)
        teacher_lib.save_sidecar(teacher, iteration_dir, iteration, _sidecar_strategy(margs),
                                 async_save=margs.async_save,
                                 async_strategy=getattr(margs, "async_strategy", "mcore"))
    result = _ORIG_SAVE_CHECKPOINT(iteration, model, optimizer, opt_param_scheduler, *args,
                                   **kwargs)
    if faults.wants("tracked", iteration, any_rank=True):  # every rank finalizes, one acts
        from megatron.training.async_utils import maybe_finalize_async_save

        maybe_finalize_async_save(blocking=True)
        faults.at("tracked", iteration)
    return result


def _maybe_finalize_async_save(*args, **kwargs):
    """Megatron's finalize of async saves (where their write errors surface), with a storage
    failure said in one line."""
    try:
        return _ORIG_FINALIZE_ASYNC_SAVE(*args, **kwargs)
    except BaseException as exc:
        line = (None if isinstance(exc, (SystemExit, KeyboardInterrupt))
                else storage.describe_save_failure(exc, get_args().save, None))
        if line is None:
            raise
        raise SystemExit(line) from exc


def _sidecar_strategy(args):
    """The main checkpoint's save options (torch_dist, fully parallel over DP when asked; async
    is passed separately)."""
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    strategy = TorchDistSaveShardedStrategy()
    if args.ckpt_fully_parallel_save:
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, mpu.get_data_parallel_group(with_context_parallel=True))
    return strategy


def _load_checkpoint(*args, **kwargs):
    """Megatron's load_checkpoint; remembers which iteration directory was resumed (not the
    --pretrained-checkpoint / --finetune case, which starts a new run)."""
    result = _ORIG_LOAD_CHECKPOINT(*args, **kwargs)
    margs = get_args()
    iteration = result[0] if isinstance(result, tuple) else 0
    if _RUN is not None and margs.load and iteration > 0 and not margs.finetune:
        iteration_dir = mt_checkpointing.get_checkpoint_name(margs.load, iteration,
                                                             return_base_dir=True)
        if os.path.isdir(iteration_dir):
            _RUN.loaded_iteration_dir = iteration_dir
    if _RUN is not None and margs.objective != "ntp":
        align_consumed_samples(margs)
    return result


def align_consumed_samples(args) -> int:
    """Start the RLP segment at a group boundary; returns the number of samples skipped.

    A group is the G consecutive sample indices ``G·k … G·k+G−1`` (rlp_megatron.data) and a
    step reads ``[consumed, consumed + global batch)``. After NTP at another batch size, an RLP
    run with another ``--rlp-group-size``, or any resume whose sample count is not a multiple of
    G, the first step would otherwise cut a group in two and the next step would hold its other
    half. Skipping to the next multiple of G (< G samples, never trained on, counted in
    Megatron's ``skipped samples``) keeps every group whole for the rest of the run: the global
    batch and any batch-size ramp-up are multiples of G (checked at startup). Runs before the
    data loader is built, which starts at ``args.consumed_train_samples``."""
    G = args.rlp_group_size * args.rlp_positions_per_doc  # K groups share a window
    consumed = int(args.consumed_train_samples)
    skip = (-consumed) % G
    if skip:
        args.consumed_train_samples = consumed + skip
        args.skipped_train_samples = getattr(args, "skipped_train_samples", 0) + skip
        flag = ("--rlp-group-size" if args.rlp_positions_per_doc == 1
                else "--rlp-group-size × --rlp-positions-per-doc")
        print_rank_0(f"rlp_megatron: consumed samples {consumed} is not a multiple of "
                     f"{flag} {G}: skipping samples {consumed}..{consumed + skip - 1} "
                     f"so that every group is {args.rlp_group_size} thoughts of one context")
    return skip


megatron_fixes.install_ckpt_writer_fixes()  # here: checkpoint workers import this, not main()
_ORIG_SAVE_CHECKPOINT = mt_training.save_checkpoint
_ORIG_FINALIZE_ASYNC_SAVE = mt_training.maybe_finalize_async_save
_ORIG_LOAD_CHECKPOINT = mt_training.load_checkpoint
_ORIG_TRAIN_STEP = mt_training.train_step
_ORIG_FLOPS = mt_training.num_floating_point_operations
_ORIG_TRAINING_LOG = mt_training.training_log


def install_hooks(args) -> Run:
    global _RUN
    _RUN = Run(args)
    mt_training.train_step = _train_step
    mt_training.num_floating_point_operations = _num_floating_point_operations
    mt_training.training_log = _training_log
    mt_training.save_checkpoint = _save_checkpoint
    mt_training.maybe_finalize_async_save = _maybe_finalize_async_save
    mt_training.load_checkpoint = _load_checkpoint
    return _RUN


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
    _check_load_dir(args)
    return args


def _check_load_dir(args) -> None:
    """A ``--load`` tracker naming an iteration whose directory is missing (deleted, or copied
    without it) stops the job here with one line; Megatron would fail deep in its loader with a
    traceback after building the model."""
    load = getattr(args, "load", None)
    tracker = os.path.join(load, "latest_checkpointed_iteration.txt") if load else None
    if not tracker or not os.path.isfile(tracker) or getattr(args, "ckpt_step", None):
        return
    text = open(tracker).read().strip()
    if not text.isdigit():  # "release", or a malformed file: Megatron's own checks apply
        return
    iteration_dir = os.path.join(load, f"iter_{int(text):07d}")
    if not os.path.isdir(iteration_dir):
        raise SystemExit(f"rlp_megatron: --load {load}: latest_checkpointed_iteration.txt names "
                         f"iteration {int(text)}, but {iteration_dir} does not exist; point the "
                         f"tracker at a complete iteration, or pass --ckpt-step")


def main(argv=None):
    args = parse_args(argv)
    megatron_fixes.install()
    install_hooks(args)
    full_config = pretrain_cfg_container_from_args(args, model_config_from_args(args))
    try:
        pretrain(
            full_config,
            train_valid_test_datasets_provider,
            ModelType.encoder_or_decoder,
            ntp_forward_step,
        )
    except BaseException as exc:  # not only Exception: torch DCP's CheckpointException
        # Without this a failed rank can hang at exit on its DataLoader workers (fix 11), and
        # torchrun never ends the job.
        if not isinstance(exc, SystemExit):
            megatron_fixes.stop_daemonic_children()
        raise


if __name__ == "__main__":
    main()
