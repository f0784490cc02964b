r"""Run the real Megatron-Core code on CPU over gloo.

Megatron-Core assumes CUDA in three ways, and this module answers each at the device layer
instead of re-implementing any Megatron code path:

1. Tensor placement. Megatron passes ``device="cuda"`` / ``torch.cuda.current_device()`` to
   factory functions, calls ``Tensor.cuda()``, ``.to("cuda")`` and ``pin_memory``. A global
   :class:`torch.overrides.TorchFunctionMode` rewrites those to CPU. It also answers a no-argument
   ``Tensor.type()`` with the CUDA type name, because the optimizer and grad clipping branch on
   ``param.type() == "torch.cuda.FloatTensor"``. A mode is off while it handles a call, so when
   ``Tensor.backward`` / ``torch.autograd.backward`` / ``.grad`` come through it the autograd engine
   is run with the mode on again: backward code (activation recompute, grad hooks) is covered too.
   Every torch call (property reads included) passes through the mode, so it rewrites only what
   needs it: a handful of tensor methods found by one dict lookup, ``device=`` / ``pin_memory=``
   keywords; anything else is forwarded untouched. What is left is torch's own C++ dispatch into a
   Python mode, ~4–5 µs a call on these machines (~500 calls per tiny GPT training iteration,
   ~10% of it); ``benchmarks/cpu_backend_overhead.py`` measures it.
2. The ``torch.cuda`` runtime API: RNG state (mapped onto the CPU default generator, so Megatron's
   model-parallel RNG tracker forks and restores the CPU stream exactly as it would the CUDA one),
   streams, events (timed with ``perf_counter``), device properties, memory statistics.
3. Megatron-level CUDA assumptions: ``initialize_megatron`` refuses to start without CUDA and
   warms up ``torch.compile`` fusions (~27 s per process), and each ``jit_fuser`` fusion
   (bias-SwiGLU, squared ReLU, ...) is an inductor compile at its first call (the first tiny GPT
   iteration took ~2.4 s instead of ~0.1 s): they run eagerly, the same functions with bitwise
   the same results (:func:`_eager_megatron_fusions`); the inference stack asserts
   ``tensor.is_cuda`` on pipeline sends and uses flash-attention / Triton kernels; the Mamba mixer
   needs mamba-ssm / causal-conv1d kernels (routed to :mod:`rlp_megatron.backends.mamba_torch`).

``--bf16`` runs on CPU (torch has bf16 CPU kernels and gloo reduces bf16), so the suite measures
what users' bf16 runs do; ``--fp16`` is refused.

The backend is enabled automatically on ``import rlp_megatron`` when CUDA is unavailable and is
never enabled when CUDA is available. It is idempotent. Features that gloo cannot serve on CPU are
refused at startup by :func:`check_cpu_args` with one line naming the flag to drop.

Megatron-LM's own unit tests check this backend: ``../shared/tools/megatron_unit_tests/`` (beside
the checkout) runs a curated subset of them (core_r0.19.0, commit f8837c04) under torchrun at world sizes 1 and 2 against
the backend named by ``MCORE_CPU_BACKEND`` (its README.md says more; the venv needs pytest-timeout,
pytest-mock and pytest-asyncio). From the repository root, with ``MLM_GIT_DIR`` a git directory of
NVIDIA/Megatron-LM holding that commit (``ONLY_GROUPS="distributed ..."`` narrows it down)::

    PY=$PWD/.venv/bin/python PYTHONPATH=$PWD \
    MCORE_CPU_BACKEND=rlp_megatron.backends.cpu:enable_cpu_backend \
    MLM_GIT_DIR=<git dir of NVIDIA/Megatron-LM> WORLD_SIZES="1 2" OUT=/tmp/mut \
    bash ../shared/tools/megatron_unit_tests/run.sh

Everything outside the ``training`` group passes (that group cannot import Megatron's
test_utils.py here, with any backend); ~8 minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import types
import warnings

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: TorchFunctionMode | None = None

_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}
_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


# What the mode passes on for each device argument seen (torch.device, str, int or None; bools are
# never looked up: False == 0). Reading ``torch.device.type`` costs ~1 µs, a dict hit ~0.1 µs.
_DEVICE_MAP: dict = {}
_DEVICE_KEY_TYPES = frozenset({torch.device, str, int, type(None)})


def _map_device(device):
    cacheable = device.__class__ in _DEVICE_KEY_TYPES
    if cacheable:
        mapped = _DEVICE_MAP.get(device, _DEVICE_MAP)
        if mapped is not _DEVICE_MAP:
            return mapped
    mapped = _CPU if _is_cuda_device(device) else device
    if cacheable and len(_DEVICE_MAP) < 64:
        _DEVICE_MAP[device] = mapped
    return mapped


# Torch functions whose body runs Python code of the model: a backward pass runs the backward of
# custom autograd Functions (Megatron's CheckpointFunction recomputes a layer there and calls
# torch.autograd.backward on it) and tensor / grad-accumulation hooks (DDP's grad reduce).
_AUTOGRAD_ENTRY_POINTS = frozenset(
    {torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad})
_TLS = threading.local()


def _cpu_kwargs(kwargs: dict) -> dict:
    """The call's keyword arguments with a CUDA ``device`` mapped to CPU and ``pin_memory`` off
    (rewritten in place: the dict is the one built for this call)."""
    if "device" in kwargs:
        kwargs["device"] = _map_device(kwargs["device"])
    if "pin_memory" in kwargs:
        kwargs["pin_memory"] = False
    return kwargs


def _call_remapped(func, args, kwargs):
    if kwargs:
        return func(*args, **_cpu_kwargs(kwargs))
    return func(*args)


def _autograd_entry(func, args, kwargs):
    pending = getattr(_TLS, "remode_engine", False)
    _TLS.remode_engine = True
    try:
        return func(*args, **(kwargs or {}))
    finally:
        _TLS.remode_engine = pending


def _tensor_cuda(func, args, kwargs):
    return args[0]


def _tensor_pin_memory(func, args, kwargs):
    return args[0]


def _tensor_is_pinned(func, args, kwargs):
    return False


def _tensor_type(func, args, kwargs):
    if len(args) == 1 and not kwargs:
        name = func(*args)
        return _CUDA_TYPE.get(name, name)
    return _call_remapped(func, args, kwargs)


def _tensor_to(func, args, kwargs):
    if len(args) > 1:
        first = args[1]
        if isinstance(first, (str, torch.device, int)) and not isinstance(first, bool):
            args = (args[0], _map_device(first), *args[2:])
    return _call_remapped(func, args, kwargs)


# The only functions whose positional arguments or result the mode changes; every other call is
# remapped by its keyword arguments alone (factories take ``device`` / ``pin_memory`` by keyword).
_HANDLERS = {
    **{func: _autograd_entry for func in _AUTOGRAD_ENTRY_POINTS},
    torch.Tensor.cuda: _tensor_cuda,
    torch.Tensor.pin_memory: _tensor_pin_memory,
    torch.Tensor.is_pinned: _tensor_is_pinned,
    torch.Tensor.type: _tensor_type,
    torch.Tensor.to: _tensor_to,
}
_handler_of = _HANDLERS.get


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requests to CPU for every torch function call.

    Every torch call of the process (tensor methods and property reads included) comes through
    ``__torch_function__`` while the mode is on, so its common path is kept to one dict lookup and
    a keyword check: only the functions in ``_HANDLERS`` and calls passing ``device=`` /
    ``pin_memory=`` are rewritten; anything else is forwarded untouched (no kwargs dict is built
    for calls that had none). ``benchmarks/cpu_backend_overhead.py`` measures what is left.

    A mode is popped while its ``__torch_function__`` runs, so the body of a function it handles
    runs outside it. For the autograd entry points that body is the whole backward pass: the
    engine is run with the mode pushed again (:func:`_engine_run_backward`), else e.g. the
    ``torch.empty(device=torch.cuda.current_device())`` of a recomputed layer under activation
    checkpointing would ask CUDA for a device.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            handler = _handler_of(func)
        except TypeError:  # an unhashable callable: not one of ours
            handler = None
        if handler is not None:
            return handler(func, args, kwargs)
        if kwargs:
            if "device" in kwargs:
                kwargs["device"] = _map_device(kwargs["device"])
            if "pin_memory" in kwargs:
                kwargs["pin_memory"] = False
            return func(*args, **kwargs)
        return func(*args)


def _patch_autograd_engine():
    """Run the autograd engine under the mode when an autograd entry point reached it through the
    mode (see :class:`CudaToCpuMode`). ``torch.autograd.backward`` and ``torch.autograd.grad`` look
    ``_engine_run_backward`` up in ``torch.autograd`` at call time, past their torch-function
    dispatch, so this is the first point where the mode can be pushed again without recursing."""
    import torch.autograd as autograd

    orig = getattr(autograd, "_engine_run_backward", None)
    if orig is None or getattr(orig, "_rlp_cpu", False):  # None: another torch (the tests tell)
        return

    def _engine_run_backward(*args, **kwargs):
        if not getattr(_TLS, "remode_engine", False) or _MODE is None:
            return orig(*args, **kwargs)
        # Consumed here: a nested entry point sets it again through the mode.
        _TLS.remode_engine = False
        torch.overrides._push_mode(_MODE)
        try:
            return orig(*args, **kwargs)
        finally:
            torch.overrides._pop_mode()
            _TLS.remode_engine = True

    _engine_run_backward._rlp_cpu = True
    autograd._engine_run_backward = _engine_run_backward


# ---------------------------------------------------------------------------------------------
# torch.cuda stand-ins. Each patched attribute gets its own function object: torch._dynamo maps
# them by id and rejects one callable assigned to several attributes.


class _Event:
    """torch.cuda.Event stand-in; elapsed_time in milliseconds like CUDA events."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **_):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end._t - self._t) * 1000.0


class _Stream:
    """torch.cuda.Stream stand-in: CPU work is already ordered."""

    def __init__(self, device=None, priority=0, **_):
        self.device = _CPU
        self.priority = priority

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _Event()
        event.record()
        return event

    def synchronize(self):
        pass

    def query(self):
        return True

    @staticmethod
    def priority_range():
        return (0, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_DEFAULT_STREAM = _Stream()


class _DeviceProps:
    name = "cpu"
    major = 9
    minor = 0
    total_memory = 64 * 1024**3
    multi_processor_count = 1
    gcnArchName = ""
    L2_cache_size = 0
    warp_size = 32


def _patch_torch_cuda():
    cuda = torch.cuda
    gen = torch.default_generator

    def current_device():
        return 0

    def device_count():
        # Megatron only sets up the model-parallel RNG and mpu when device_count() > 0.
        return 1

    def is_available():
        return False

    def set_device(device):
        pass

    def synchronize(device=None):
        pass

    def empty_cache():
        pass

    def get_rng_state(device="cuda"):
        return gen.get_state()

    def random_get_rng_state(device="cuda"):
        return gen.get_state()

    def set_rng_state(new_state, device="cuda"):
        gen.set_state(new_state)

    def random_set_rng_state(new_state, device="cuda"):
        gen.set_state(new_state)

    def manual_seed(seed):
        # Not torch.manual_seed: it calls back into cuda.manual_seed_all.
        gen.manual_seed(int(seed))

    def manual_seed_all(seed):
        pass

    def seed():
        gen.seed()

    def seed_all():
        pass

    def current_stream(device=None):
        return _DEFAULT_STREAM

    def default_stream(device=None):
        return _DEFAULT_STREAM

    def set_stream(stream):
        pass

    def get_device_properties(device=None):
        return _DeviceProps()

    def get_device_capability(device=None):
        return (9, 0)

    def get_device_name(device=None):
        return "cpu"

    def is_current_stream_capturing():
        return False

    def memory_allocated(device=None):
        return 0

    def max_memory_allocated(device=None):
        return 0

    def memory_reserved(device=None):
        return 0

    def max_memory_reserved(device=None):
        return 0

    def memory_stats(device=None):
        return {}

    def reset_peak_memory_stats(device=None):
        pass

    def mem_get_info(device=None):
        return (_DeviceProps.total_memory, _DeviceProps.total_memory)

    class StreamContext:  # mirrors torch.cuda.StreamContext: reusable, unlike a generator
        # context manager (Megatron enters one torch.cuda.stream(...) object twice when it
        # overlaps the grad reduce with several distributed-optimizer instances).
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            return False

    def stream(stream=None):
        return StreamContext(stream)

    class device:  # noqa: N801 - mirrors torch.cuda.device
        def __init__(self, device=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class _Generators(tuple):
        pass

    patches = dict(
        current_device=current_device,
        device_count=device_count,
        is_available=is_available,
        set_device=set_device,
        synchronize=synchronize,
        empty_cache=empty_cache,
        get_rng_state=get_rng_state,
        set_rng_state=set_rng_state,
        manual_seed=manual_seed,
        manual_seed_all=manual_seed_all,
        seed=seed,
        seed_all=seed_all,
        current_stream=current_stream,
        default_stream=default_stream,
        set_stream=set_stream,
        stream=stream,
        StreamContext=StreamContext,
        Stream=_Stream,
        Event=_Event,
        device=device,
        get_device_properties=get_device_properties,
        get_device_capability=get_device_capability,
        get_device_name=get_device_name,
        is_current_stream_capturing=is_current_stream_capturing,
        memory_allocated=memory_allocated,
        max_memory_allocated=max_memory_allocated,
        memory_reserved=memory_reserved,
        max_memory_reserved=max_memory_reserved,
        memory_stats=memory_stats,
        reset_peak_memory_stats=reset_peak_memory_stats,
        mem_get_info=mem_get_info,
        default_generators=_Generators((gen,)),
    )
    for name, value in patches.items():
        setattr(cuda, name, value)
    cuda.random.get_rng_state = random_get_rng_state
    cuda.random.set_rng_state = random_set_rng_state
    # Keep NVTX ranges harmless (they are no-ops without CUDA in recent torch, but be explicit).
    cuda.nvtx = types.SimpleNamespace(
        range_push=lambda *a, **k: None,
        range_pop=lambda *a, **k: None,
        range=contextlib.nullcontext,
        mark=lambda *a, **k: None,
    )


# ---------------------------------------------------------------------------------------------
# Megatron-level patches.


def _eager_megatron_fusions() -> int:
    """Run Megatron's ``jit_fuser`` fusions eagerly: the same Python functions, not compiled.

    ``megatron.core.jit.jit_fuser`` is ``torch.compile``; on CPU the first call of each fusion
    (bias-SwiGLU in the tiny GPT, squared-ReLU in the hybrid, L2 norm, ...) is an inductor C++
    compile of several seconds, and the first iteration costs many steady ones. Megatron's own
    switch for this, ``megatron.core.jit.disable_jit_fuser()`` (``--disable-jit-fuser``), only
    affects modules imported after it, while ``import megatron.core`` already decorates the
    fusions. So: flip that switch, then rebind every ``torch.compile`` wrapper that an imported
    ``megatron.*`` module (or a class in it) holds to the function it wraps. Megatron keeps its
    fused code paths (``bias_swiglu_impl`` and its autograd Function, ...); only the compile goes.
    ``RLP_MEGATRON_CPU_COMPILE_FUSIONS=1`` keeps them compiled. Returns how many were rebound.
    """
    if os.environ.get("RLP_MEGATRON_CPU_COMPILE_FUSIONS", "0") == "1":
        return 0
    from megatron.core import jit

    jit.disable_jit_fuser()

    def unwrapped(value):
        inner = value
        while isinstance(inner, types.FunctionType) and "_torchdynamo_orig_callable" in vars(inner):
            inner = vars(inner)["_torchdynamo_orig_callable"]
        return inner

    rebound = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "megatron" or name.startswith("megatron.")):
            continue
        owners = [module]
        owners += [v for k, v in vars(module).items()
                   if isinstance(v, type) and v.__module__ == name]
        for owner in owners:
            for attr, value in list(vars(owner).items()):
                wrapped = value.__func__ if isinstance(value, staticmethod) else value
                inner = unwrapped(wrapped)
                if inner is wrapped:
                    continue
                setattr(owner, attr, staticmethod(inner) if wrapped is not value else inner)
                rebound += 1
    return rebound


def _patch_megatron():
    from megatron.core.tensor_parallel import random as tp_random

    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.default_generator.get_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.default_generator.set_state(new_state)

    tp_random._get_cuda_rng_state = _get_cuda_rng_state
    tp_random._set_cuda_rng_state = _set_cuda_rng_state

    from megatron.core.inference import communication_utils

    def _is_cuda(tensor):
        assert tensor is not None

    communication_utils._is_cuda = _is_cuda

    try:
        from megatron.core.inference.contexts import dynamic_context

        dynamic_context.triton_append_key_value_cache = None
    except ImportError:  # pragma: no cover - older/newer layouts
        pass

    from megatron.training import initialize as mt_initialize
    from megatron.training import training as mt_training

    if not getattr(mt_initialize.initialize_megatron, "_rlp_cpu", False):
        orig_initialize = mt_initialize.initialize_megatron

        def initialize_megatron(*args, **kwargs):
            kwargs["allow_no_cuda"] = True
            return orig_initialize(*args, **kwargs)

        initialize_megatron._rlp_cpu = True
        mt_initialize.initialize_megatron = initialize_megatron
        mt_training.initialize_megatron = initialize_megatron

    def set_jit_fusion_options(tp_size=None):
        # The fusion warm-up is a torch.compile of CUDA kernels; on CPU it costs ~27 s a process
        # (and the fusions run eagerly on CPU anyway: _eager_megatron_fusions).
        pass

    mt_initialize.set_jit_fusion_options = set_jit_fusion_options
    mt_training.set_jit_fusion_options = set_jit_fusion_options

    from rlp_megatron.backends import mamba_torch

    mamba_torch.install()
    _eager_megatron_fusions()


def enable_cpu_backend(force: bool = False) -> bool:
    """Enable the CPU backend; returns True when it is (or already was) active.

    Never enables when CUDA is available unless ``force`` (used by nothing in production; it exists
    so a GPU developer can reproduce a CPU CI failure).
    """
    global _ENABLED, _MODE
    if _ENABLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # validate_args insists on it for TP/CP (a CUDA stream-ordering requirement); meaningless here.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _patch_torch_cuda()
    _patch_autograd_engine()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _patch_megatron()
    return True


def cpu_backend_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def suspended():
    """Temporarily leave the CUDA→CPU torch-function mode (e.g. around third-party code)."""
    if not _ENABLED:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


# Megatron features that need NCCL/CUDA-only collectives or kernels; each entry:
# (predicate on args, the flag to drop, why).
_UNSUPPORTED_ON_CPU = (
    (lambda a: getattr(a, "transformer_impl", "local") == "transformer_engine",
     "--transformer-impl transformer_engine", "use --transformer-impl local"),
    (lambda a: getattr(a, "fp16", False), "--fp16",
     "fp16 with a loss scaler is untested on CPU; --bf16 runs"),
    (lambda a: getattr(a, "tp_comm_overlap", False), "--tp-comm-overlap", "needs CUDA userbuffers"),
    (lambda a: getattr(a, "use_flash_attn", False), "--use-flash-attn", "needs CUDA"),
    (lambda a: getattr(a, "cuda_graph_impl", "none") != "none", "--cuda-graph-impl", "needs CUDA"),
    (lambda a: getattr(a, "gradient_accumulation_fusion", False),
     "gradient accumulation fusion", "pass --no-gradient-accumulation-fusion"),
)


def check_cpu_args(args) -> None:
    """Fail at startup, in one line naming the flag, for features the CPU backend cannot run."""
    if not _ENABLED:
        return
    for pred, flag, why in _UNSUPPORTED_ON_CPU:
        if pred(args):
            raise SystemExit(f"rlp_megatron: {flag} is not supported on the CPU backend ({why}); "
                             f"drop it for CPU runs.")
