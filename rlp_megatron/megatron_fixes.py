"""Narrow fixes for Megatron-Core bugs that break exact resume; installed by `rlp_megatron.train`.

Megatron's ``DistributedOptimizer`` wraps plain ``torch.optim.Adam/AdamW`` whenever neither apex nor
Transformer Engine provides a fused Adam ("Falling back to Torch optimizers"): on our CPU backend,
and on any GPU install without them. megatron-core 0.19.x has three resume bugs on that path:

1. ``state_dict()`` before the first optimizer step (e.g. the checkpoint loader builds a template
   state dict) asserts ``len(steps) == 1``: torch Adam allocates its state lazily, so there are no
   steps yet. Fix: allocate the Adam state eagerly (``step=0``, zero moments), which is exactly what
   torch's lazy initialisation would create at the first step.
2. ``load_state_dict()`` assigns *one* ``step`` tensor object to every parameter's state. Torch Adam
   increments each parameter's ``step`` in place, so the shared tensor advances once per parameter
   per iteration (5 → 33 → 61 with 28 parameters) and bias correction is silently wrong after a
   resume. Fix: give every parameter its own copy after loading.
3. The ``dp_reshardable`` parameter-state loader copies into the fp32 main parameters without
   ``torch.no_grad()`` ("a view of a leaf Variable that requires grad is being used in an in-place
   operation") and copies the checkpoint template's ``step`` over the real one. Fix: run
   ``_set_main_param_and_optimizer_states`` under ``no_grad`` and skip ``step`` there, as Megatron's
   other two loaders (fully reshardable, fs model space) already do.

4. ``WrappedTorchNorm`` (the norm of ``--transformer-impl local``) asserts that sequence parallelism
   is off, although nothing in it depends on the sequence layout: the only requirement is that its
   weights are marked ``sequence_parallel`` so that ``finalize_model_grads`` all-reduces their
   gradients over TP, as Megatron's fused and TE norms do. Fix: build it with the flag lowered and
   mark the parameters. (Measured: TP=2 with and without ``--sequence-parallel`` give bitwise
   equal losses for GPT and hybrid models on CPU.)

5. ``MambaMixer._decode`` hands ``_ssm_decode`` a (1, batch, d) tensor where it expects
   (batch, 1, d), so static-batching decode with batch > 1 (every RLP rollout of a hybrid model)
   advances all rows through the SSM state of row 0 — with the CUDA kernels too. Fix: see
   :func:`rlp_megatron.backends.mamba_torch._fix_static_batch_decode`; installed through
   ``mamba_torch.install()``, which also routes the Mamba kernels to PyTorch when mamba-ssm /
   causal-conv1d are missing (and keeps them when they are importable on a GPU).

6. Optimizer param groups are matched to the checkpoint's by an identifier that includes
   ``max_lr``/``min_lr``/``start_wd``/``end_wd``, so relaunching with another ``--lr`` (switching an
   NTP job to RLP's constant 1e-6) fails with "Could not find parameter group with key ..." unless
   the Adam state is dropped; and where groups do match, the loaded ``max_lr`` wins over the
   command line (Megatron-LM #1138). Fix, only with ``--override-opt-param-scheduler``: a saved
   group that matches exactly one current group on every other identifier key takes the current
   group's LR/WD bounds, so Adam moments load and the LR schedule follows the command line.

7. ``initialize_megatron`` runs ``make -C megatron/core/datasets`` on rank 0 to build the dataset
   index helpers. The megatron-core wheel ships them compiled (``helpers_cpp*.so``) but without
   the Makefile, so on any device a pip install exits before training ("Failed to compile the
   C++ dataset helper functions"). Fix: use the shipped extension when it imports; compile (as
   Megatron does) only when it does not, e.g. in a source checkout.

8. ``HybridModel.forward`` has no ``output_processor`` seam (``GPTModel`` has had it since
   Megatron-LM PR #4686; the hybrid port is PR #7008, open), so RLP's log-prob kernels could not
   replace the hybrid model's logits. Fix: accept ``output_processor=`` /
   ``output_processor_context=`` as ``GPTModel`` does. The wrapper runs the model with
   ``post_process`` lowered for the call — upstream's forward then returns the final-norm hidden
   states right before its output layer, the same point at which ``GPTModel`` calls the processor —
   and calls the processor with ``GPTModel``'s keyword arguments. Without a processor the call is
   upstream's, untouched. Never switched off (RLP's default log-prob path needs it).

9. Static-batching decode (``StaticInferenceContext``, what the rollout uses) caches keys before
   their rotary embedding and re-rotates the whole cached key sequence ``k_pos_emb[:sequence_end]``
   in every attention layer at every decode step, so a step's cost grows with its position
   (measured on CPU: 19% of rollout samples were RoPE). Fix, for contexts that opt in with
   ``rotated_key_cache = True`` (the rollout's, :mod:`rlp_megatron.rollout.inference`): rotate
   only the new keys, at their positions, before they enter the cache; the query is rotated as
   before. Rotation is elementwise per position, so the logits are bitwise those of upstream's
   path (tested). This is what Megatron's flash-decode and dynamic-batching paths do, neither of
   which runs without flash-attn. Other static contexts are untouched; never switched off.

10. ``--async-save`` (with ``--use-persistent-ckpt-worker``, without which megatron-core 0.19
    turns async saving off): when a rank is SIGKILLed (a node's OOM killer, a launcher's
    teardown after a peer died), its checkpoint helper processes outlive the job. Measured after
    a SIGKILL: the persistent checkpoint worker (a ``forkserver`` child blocked on its request
    queue, whose write end it holds itself), the forkserver (kept alive by the worker's copy of
    its "alive" pipe) and their resource tracker, still running a minute later; with sync saves,
    the ``multiprocessing`` Manager server of the checkpoint writer's result queue
    (``filesystem_async.get_write_results_queue``) and its resource tracker. They hold the rank's
    pinned host memory (on GPU a CUDA context too) and one more set is left per relaunch of an
    elastic (``--max-restarts``) job; the worker can still be writing into the iteration
    directory that the relaunch is about to save again. Fix: the worker and the Manager server
    run a daemon thread that waits on their parent's process sentinel and exits when the parent
    is gone, however it ended (the watch torch's DataLoader workers keep); the forkserver and the
    trackers then see their last client close and exit too. Installed at import of
    :mod:`rlp_megatron.train`, so that the forkserver, which imports it as its main module but
    never runs ``main``, has it too.

11. With ``--exit-signal-handler``, Megatron's DataLoader ``worker_init_fn`` installs the exit
    signal's handler in every DataLoader worker too, so the workers ignore SIGTERM (on purpose:
    a SIGTERM sent to every process of a job step must not take the data away from a rank that
    is saving its preemption checkpoint). But a rank that fails with an exception (a collective
    timing out on a hung peer, an I/O error) exits through ``multiprocessing``'s exit function,
    which stops its daemonic children with SIGTERM and then joins them: it waits forever, and
    torchrun, seeing no failed worker, never tears the job down. Measured: a peer SIGSTOPped,
    this rank's collective timed out after 10 s, and the rank then hung at exit for the 600 s
    the test waited. Fix: when training ends with an exception, :func:`stop_daemonic_children`
    SIGKILLs the rank's daemonic children (DataLoader workers, the checkpoint worker, whose
    in-flight save could not be finalized anyway) before the exception propagates. A normal
    exit and a preemption (``SystemExit`` after the save) are unchanged.

Set ``RLP_MEGATRON_MEGATRON_FIXES=0`` to run without fixes 1-6, 10 and 11 (the tests use it to show each bug).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch

_INSTALLED = False


def _torch_adam_without_fused_backend() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate torch Adam/AdamW state now, identical to what its first step() would create."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if len(state) > 0:
                continue
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad", False):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _unshare_steps(optimizer: torch.optim.Optimizer) -> None:
    seen = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.detach().clone()
            seen.add(id(state["step"]))


def _allow_sequence_parallel_torch_norm() -> None:  # fix 4
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    if getattr(cls.__new__, "_rlp_sp", False):
        return
    original_new = cls.__new__

    def __new__(cls_, config, hidden_size, eps=1e-5, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls_, config, hidden_size, eps, **kwargs)
        config.sequence_parallel = False
        try:
            norm = original_new(cls_, config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = True
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    __new__._rlp_sp = True
    cls.__new__ = staticmethod(__new__)


_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _override_requested() -> bool:
    try:
        from megatron.training import get_args

        return bool(get_args().override_opt_param_scheduler)
    except Exception:  # no Megatron-LM args (library use): keep Megatron's behaviour
        return False


def _group_value(group: dict, key: str):
    if key in group:
        return group[key]
    return group.get(f"pre_{key}")


def align_saved_param_groups(current_groups: list[dict], saved_groups: list[dict]) -> int:
    """Give saved groups the current groups' LR/WD bounds where they match on every other
    identifier key (fix 6). Returns how many saved groups were re-aligned."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    structural = [k for k in param_group_identifier_keys if k not in _SCHEDULE_KEYS]
    full = lambda g: tuple(_group_value(g, k) for k in param_group_identifier_keys)
    struct = lambda g: tuple(_group_value(g, k) for k in structural)
    current_full = {full(g) for g in current_groups}
    changed = 0
    for saved in saved_groups:
        if full(saved) in current_full:
            continue
        same = [g for g in current_groups if struct(g) == struct(saved)]
        twins = [g for g in saved_groups if struct(g) == struct(saved)]
        if len(same) == 1 and len(twins) == 1:
            for key in _SCHEDULE_KEYS:
                saved.pop(f"pre_{key}", None)
                if key in same[0]:
                    saved[key] = same[0][key]
                else:
                    saved.pop(key, None)
            changed += 1
    return changed


def _allow_lr_change_on_resume() -> None:  # fix 6
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    original = MegatronOptimizer._filter_and_reorder_param_groups
    if getattr(original, "_rlp_lr_change", False):
        return

    def _filter_and_reorder_param_groups(current_groups, state_dict_groups):
        if _override_requested():
            align_saved_param_groups(current_groups, state_dict_groups)
        return original(current_groups, state_dict_groups)

    _filter_and_reorder_param_groups._rlp_lr_change = True
    MegatronOptimizer._filter_and_reorder_param_groups = staticmethod(
        _filter_and_reorder_param_groups)

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original_load = DistributedOptimizer.load_state_dict

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        groups = state_dict.get("optimizer", {}).get("param_groups")
        if groups is not None and _override_requested():
            align_saved_param_groups(self.optimizer.param_groups, groups)
        return original_load(self, state_dict)

    DistributedOptimizer.load_state_dict = load_state_dict


def _use_shipped_dataset_helpers() -> None:  # fix 7
    from megatron.core.datasets import utils as ds_utils

    if getattr(ds_utils.compile_helpers, "_rlp_fix", False):
        return
    orig_compile = ds_utils.compile_helpers

    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            return orig_compile()

    compile_helpers._rlp_fix = True
    ds_utils.compile_helpers = compile_helpers


def _hybrid_output_processor() -> None:  # fix 8
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    if getattr(HybridModel.forward, "_rlp_fix", False):
        return
    original = HybridModel.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, input_ids, position_ids, attention_mask, *args, output_processor=None,
                output_processor_context=None, **kwargs):
        if output_processor is None or not self.post_process:
            return original(self, input_ids, position_ids, attention_mask, *args, **kwargs)
        if self.config.mtp_num_layers:
            raise NotImplementedError("output_processor with multi-token prediction")
        self.post_process = False
        try:
            hidden_states = original(self, input_ids, position_ids, attention_mask, *args,
                                     **kwargs)
        finally:
            self.post_process = True
        output_weight = None
        if self.share_embeddings_and_output_weights:
            output_weight = self.shared_embedding_or_output_weight()
        given = signature.bind(self, input_ids, position_ids, attention_mask, *args,
                               **kwargs).arguments
        return output_processor(
            hidden_states=hidden_states, output_layer=self.output_layer,
            output_weight=output_weight, labels=given.get("labels"),
            loss_mask=given.get("loss_mask"), input_ids=input_ids, position_ids=position_ids,
            attention_mask=attention_mask, decoder_input=given.get("decoder_input"),
            inference_context=given.get("inference_context"),
            packed_seq_params=given.get("packed_seq_params"),
            runtime_gather_output=given.get("runtime_gather_output"),
            context=output_processor_context,
            compute_language_model_loss=self.compute_language_model_loss,
            scale_logits=self._scale_logits, config=self.config)

    forward._rlp_fix = True
    HybridModel.forward = forward


def _static_decode_rotates_new_keys() -> None:  # fix 9
    from megatron.core.transformer import attention

    original = attention.Attention._adjust_key_value_for_inference
    if getattr(original, "_rlp_fix", False):
        return

    @functools.wraps(original)
    def adjust(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        if (inference_context is None or not getattr(inference_context, "rotated_key_cache", False)
                or not inference_context.is_static_batching() or self.config.flash_decode
                or rotary_pos_emb is None or rotary_pos_emb[1] is None):
            return original(self, inference_context, query, key, value, rotary_pos_emb, *args,
                            **kwargs)
        start = inference_context.sequence_len_offset
        key = attention.apply_rotary_pos_emb(
            key, rotary_pos_emb[1][start : start + key.size(0)], config=self.config,
            mscale=self._yarn_concentration_factor, cp_group=self.pg_collection.cp)
        query, key, value, (q_pos_emb, _), mask_type, block_table = original(
            self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        return query, key, value, (q_pos_emb, None), mask_type, block_table  # key: rotated

    adjust._rlp_fix = True
    attention.Attention._adjust_key_value_for_inference = adjust


def exit_with_parent() -> None:
    """In a child process: exit as soon as the parent process is gone (fix 10)."""
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        parent.join()  # the parent's sentinel: returns when it is gone, however it ended
        os._exit(0)

    threading.Thread(target=watch, name="rlp-parent-watch", daemon=True).start()


def install_ckpt_writer_fixes() -> None:  # fix 10
    if os.environ.get("RLP_MEGATRON_MEGATRON_FIXES", "1") == "0":
        return
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async.get_write_results_queue, "_rlp_fix", False):
        return

    def get_write_results_queue(mp_mode: str = "spawn"):
        if filesystem_async._results_queue is None:
            manager = SyncManager(ctx=multiprocessing.get_context(mp_mode))  # = ctx.Manager()
            manager.start(initializer=exit_with_parent)
            filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager
        return filesystem_async._results_queue

    get_write_results_queue._rlp_fix = True
    filesystem_async.get_write_results_queue = get_write_results_queue

    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    _ORIGINAL["async_loop"] = PersistentAsyncCaller.async_loop
    PersistentAsyncCaller.async_loop = staticmethod(persistent_ckpt_worker_loop)


_ORIGINAL: dict = {}


def persistent_ckpt_worker_loop(*args, **kwargs):
    """``PersistentAsyncCaller.async_loop``, in a worker that exits when its rank does (fix 10).
    Module level, so that the worker unpickles it by name."""
    exit_with_parent()
    loop = _ORIGINAL.get("async_loop")
    if loop is None:  # a worker whose imports did not install the fix: the class is upstream's
        from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

        loop = PersistentAsyncCaller.async_loop
    return loop(*args, **kwargs)


def stop_daemonic_children() -> list[int]:  # fix 11
    """SIGKILL this process's daemonic ``multiprocessing`` children (what its exit function
    would SIGTERM); returns their pids."""
    import multiprocessing

    if os.environ.get("RLP_MEGATRON_MEGATRON_FIXES", "1") == "0":
        return []
    import signal

    # The DataLoader's SIGCHLD handler would raise "worker killed" into the joins below.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = [c for c in multiprocessing.active_children() if c.daemon]
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)
    stopped = [c.pid for c in children]
    return stopped


def install_seams() -> None:
    """The fixes that add seams RLP's own code opts into (no behaviour change for anyone else)."""
    _hybrid_output_processor()  # fix 8
    _static_decode_rotates_new_keys()  # fix 9


def install() -> None:
    """Install the fixes (idempotent; the Adam ones are no-ops when apex/TE fused Adam is used)."""
    global _INSTALLED
    _use_shipped_dataset_helpers()  # fix 7: without it nothing starts, so never switched off
    install_seams()  # never switched off
    if _INSTALLED or os.environ.get("RLP_MEGATRON_MEGATRON_FIXES", "1") == "0":
        return
    _INSTALLED = True
    _allow_sequence_parallel_torch_norm()
    from rlp_megatron.backends import mamba_torch

    mamba_torch.install()  # fix 5 (and kernel routing where mamba-ssm is absent)
    _allow_lr_change_on_resume()
    if not _torch_adam_without_fused_backend():
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    orig_state_dict = DistributedOptimizer.state_dict
    orig_load_state_dict = DistributedOptimizer.load_state_dict
    orig_set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(orig_state_dict)
    def state_dict(self):
        _ensure_adam_state(self.optimizer)  # fix 1
        return orig_state_dict(self)

    @functools.wraps(orig_load_state_dict)
    def load_state_dict(self, state_dict):
        _ensure_adam_state(self.optimizer)  # fix 1: reuse the state instead of dummy tensors
        result = orig_load_state_dict(self, state_dict)
        _unshare_steps(self.optimizer)  # fix 2
        return result

    @functools.wraps(orig_set_states)
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        tensors = {k: v for k, v in tensors.items() if k != "step"}  # fix 3
        # The destination may hold a `step` entry; give it a value it already has.
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state.get(main_param, {}).get("step")
        if isinstance(step, torch.Tensor):
            tensors["step"] = step.detach().clone()
        with torch.no_grad():  # fix 3
            return orig_set_states(self, model_param, tensors)

    DistributedOptimizer.state_dict = state_dict
    DistributedOptimizer.load_state_dict = load_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
