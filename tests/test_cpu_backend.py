"""The CPU device layer (rlp_megatron.backends.cpu): CUDA placement lands on CPU, the torch.cuda RNG
is the CPU default generator, unsupported flags are refused in one line, and the backend turns on
exactly when CUDA is unavailable. Fast, mostly in-process; three short subprocesses."""

import argparse
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import rlp_megatron  # noqa: F401  (enables the backend when there is no GPU)
from harness import REPO, TINY_GPT, TRAIN_FLAGS
from rlp_megatron.backends import cpu

pytestmark = pytest.mark.skipif(
    not cpu.cpu_backend_enabled(), reason="CUDA is available: the CPU backend is (rightly) off"
)

CUDA_DEVICES = ["cuda", "cuda:0", torch.device("cuda"), torch.device("cuda", 0), 0]
FACTORIES = {
    "zeros": lambda d: torch.zeros(2, 3, device=d),
    "empty": lambda d: torch.empty(4, device=d),
    "ones": lambda d: torch.ones(2, device=d, dtype=torch.long),
    "full": lambda d: torch.full((2,), 7.0, device=d),
    "arange": lambda d: torch.arange(5, device=d),
    "randn": lambda d: torch.randn(3, device=d),
    "tensor": lambda d: torch.tensor([1.0, 2.0], device=d),
    "zeros_like": lambda d: torch.zeros_like(torch.ones(3), device=d),
}
BANNED_MODULES = ("transformer_engine", "mamba_ssm", "causal_conv1d", "apex")


def _subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "RLP_MEGATRON_CPU_BACKEND"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra)
    return env


def _run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def _last_json_line(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


# --------------------------------------------------------------------------------------------
# Placement


@pytest.mark.parametrize("device", CUDA_DEVICES, ids=str)
@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_factory_with_cuda_device_lands_on_cpu(factory, device):
    t = FACTORIES[factory](device)
    assert t.device.type == "cpu"


def test_factory_with_current_device_lands_on_cpu():
    assert torch.cuda.current_device() == 0
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"


def test_tensor_cuda_returns_self():
    t = torch.arange(4.0)
    assert t.cuda() is t
    assert t.cuda(torch.cuda.current_device(), non_blocking=True) is t


def test_module_cuda_keeps_parameters_on_cpu():
    lin = torch.nn.Linear(3, 2)
    before = lin.weight.detach().clone()
    lin.cuda(torch.cuda.current_device())
    assert lin.weight.device.type == "cpu"
    assert torch.equal(lin.weight, before)


@pytest.mark.parametrize("device", CUDA_DEVICES, ids=str)
def test_to_cuda_lands_on_cpu(device):
    t = torch.arange(3.0)
    assert t.to(device).device.type == "cpu"
    assert t.to(device=device).device.type == "cpu"
    moved = t.to(device, torch.float64, non_blocking=True)
    assert moved.device.type == "cpu" and moved.dtype == torch.float64
    assert torch.equal(moved, t.double())


def test_to_dtype_is_untouched():
    t = torch.arange(3)
    assert t.to(torch.float32).dtype == torch.float32
    assert t.to(torch.ones(1, dtype=torch.float64)).dtype == torch.float64


def test_pin_memory_is_stripped():
    t = torch.empty(4, pin_memory=True)
    assert not t.is_pinned()
    assert t.pin_memory() is t
    assert torch.zeros(2, device="cuda", pin_memory=True).device.type == "cpu"


@pytest.mark.parametrize("dtype,name", [
    (torch.float32, "torch.cuda.FloatTensor"),
    (torch.float16, "torch.cuda.HalfTensor"),
    (torch.bfloat16, "torch.cuda.BFloat16Tensor"),
    (torch.float64, "torch.cuda.DoubleTensor"),
    (torch.int64, "torch.cuda.LongTensor"),
    (torch.int32, "torch.cuda.IntTensor"),
    (torch.bool, "torch.cuda.BoolTensor"),
])
def test_no_arg_type_gives_cuda_type_name(dtype, name):
    assert torch.zeros(2, dtype=dtype).type() == name


def test_type_with_argument_still_converts():
    t = torch.arange(3)
    assert t.type(torch.float64).dtype == torch.float64
    assert t.type("torch.FloatTensor").dtype == torch.float32
    # The check Megatron's optimizer / grad clipping make on every grad.
    p = torch.nn.Parameter(torch.ones(2))
    p.sum().backward()
    assert p.grad.type() == "torch.cuda.FloatTensor"


def test_non_cuda_devices_and_other_keywords_pass_through():
    assert torch.empty(2, device="meta").device.type == "meta"
    assert torch.zeros(2, device=torch.device("cpu")).device.type == "cpu"
    assert torch.arange(3.0).to("meta").device.type == "meta"
    assert torch.zeros(2, device=0).device.type == "cpu"  # cached as CPU ...
    assert cpu._map_device(False) is False  # ... which must not leak to False == 0
    assert torch.nn.functional.softmax(torch.zeros(2), dim=0).tolist() == [0.5, 0.5]


def test_unhashable_callable_through_the_mode():
    class Scale:  # a torch-function API that is not hashable (defines __eq__ only)
        def __eq__(self, other):
            return self is other

        def __call__(self, t, scale=1, device=None):
            return t * scale, device

    x = torch.ones(2)
    out, device = torch.overrides.handle_torch_function(Scale(), (x,), x, scale=3, device="cuda")
    assert out.tolist() == [3.0, 3.0] and device == torch.device("cpu")


# --------------------------------------------------------------------------------------------
# torch.cuda runtime


def test_torch_cuda_answers_like_one_cpu_device():
    assert torch.cuda.is_available() is False
    assert torch.cuda.device_count() == 1
    torch.cuda.set_device(0)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.randn(64, 64) @ torch.randn(64, 64)
    end.record()
    assert end.elapsed_time(start) <= 0 <= start.elapsed_time(end) < 60_000
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())


def test_cuda_rng_state_round_trip_reproduces_numbers():
    state = torch.cuda.get_rng_state()
    first = torch.rand(8)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(8), first)
    # the same stream through torch.cuda.random and Megatron's private accessors
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.random.set_rng_state(state)
    assert torch.equal(torch.rand(8), first)
    tp_random._set_cuda_rng_state(tp_random._get_cuda_rng_state())  # no-op round trip
    saved = tp_random._get_cuda_rng_state()
    again = torch.randn(5)
    tp_random._set_cuda_rng_state(saved)
    assert torch.equal(torch.randn(5), again)


def test_cuda_rng_is_the_cpu_default_generator():
    torch.cuda.manual_seed(1234)
    assert torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
    assert torch.cuda.default_generators[0] is torch.default_generator
    a = torch.rand(6)
    torch.manual_seed(1234)  # must not recurse through torch.cuda.manual_seed_all
    assert torch.equal(torch.rand(6), a)
    torch.cuda.manual_seed(4321)
    assert not torch.equal(torch.rand(6), a)


def test_megatron_rng_tracker_forks_and_restores_the_cpu_stream():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    def forked_draws():
        tracker = CudaRNGStatesTracker()
        tracker.add("model-parallel-rng", 2718)
        torch.manual_seed(0)
        with tracker.fork("model-parallel-rng"):
            inside = torch.rand(4)
        return inside, torch.rand(4)

    inside, after = forked_draws()
    torch.manual_seed(0)
    assert torch.equal(torch.rand(4), after)  # the fork left the default stream where it was
    inside_again, _ = forked_draws()
    assert torch.equal(inside, inside_again)  # the forked stream is reproducible from its seed
    assert not torch.equal(inside, after)


# --------------------------------------------------------------------------------------------
# Megatron's jit_fuser fusions run eagerly (no inductor compile on the first iteration)


def _compiled_in_megatron_modules():
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("megatron"):
            continue
        owners = [module] + [v for v in vars(module).values()
                             if isinstance(v, type) and v.__module__ == name]
        for owner in owners:
            for attr, value in vars(owner).items():
                value = value.__func__ if isinstance(value, staticmethod) else value
                if (isinstance(value, types.FunctionType)
                        and "_torchdynamo_orig_callable" in vars(value)):
                    found.append(f"{name}:{getattr(owner, '__name__', '')}.{attr}")
    return found


def test_megatron_fusions_are_not_compiled_on_cpu():
    from megatron.core import jit
    from megatron.core.models.gpt import gpt_model  # noqa: F401  (what training imports)
    from megatron.core.models.hybrid import hybrid_model  # noqa: F401

    assert jit.jit_fuser is jit.noop_decorator
    assert _compiled_in_megatron_modules() == []


def test_bias_swiglu_fusion_runs_megatrons_function_eagerly():
    """The fused code path is kept (Megatron's SwiGLUFunction and its hand-written backward),
    without dynamo: no frame is compiled, and it computes bias + SwiGLU."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
    from torch._dynamo.utils import counters

    frames = counters["frames"]["total"]
    torch.manual_seed(0)
    y = torch.randn(3, 2, 8, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    out = bias_swiglu_impl(y, bias)
    out.square().sum().backward()
    y_ref, bias_ref = y.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    a, b = torch.chunk(y_ref + bias_ref, 2, -1)
    ref = torch.nn.functional.silu(a) * b
    ref.square().sum().backward()
    assert counters["frames"]["total"] == frames
    assert torch.equal(out, ref)
    assert torch.allclose(y.grad, y_ref.grad, atol=1e-6)
    assert torch.allclose(bias.grad, bias_ref.grad, atol=1e-6)


def test_already_imported_compiled_functions_are_rebound(monkeypatch):
    name = "megatron._rlp_test_fusions"
    module = types.ModuleType(name)

    def double(x):
        return x * 2

    def plus_one(self, x):
        return x + 1

    def minus_one(x):
        return x - 1

    holder = type("Holder", (), {"__module__": name, "plus_one": torch.compile(plus_one),
                                 "minus_one": staticmethod(torch.compile(minus_one))})
    module.double, module.Holder = torch.compile(torch.compile(double)), holder
    monkeypatch.setitem(sys.modules, name, module)

    monkeypatch.setenv("RLP_MEGATRON_CPU_COMPILE_FUSIONS", "1")  # the switch back to compiling
    assert cpu._eager_megatron_fusions() == 0 and module.double is not double
    monkeypatch.delenv("RLP_MEGATRON_CPU_COMPILE_FUSIONS")
    assert cpu._eager_megatron_fusions() == 3
    assert module.double is double and holder.__dict__["plus_one"] is plus_one
    assert holder.__dict__["minus_one"].__func__ is minus_one
    assert holder().plus_one(1) == 2 and holder.minus_one(1) == 0
    assert cpu._eager_megatron_fusions() == 0  # idempotent


# --------------------------------------------------------------------------------------------
# Enabling and refusing


def test_enable_cpu_backend_is_idempotent():
    def modes():
        stack = torch.overrides._get_current_function_mode_stack()
        return [m for m in stack if isinstance(m, cpu.CudaToCpuMode)]

    current_device, mode = torch.cuda.current_device, modes()
    assert len(mode) == 1
    assert cpu.enable_cpu_backend() is True
    assert cpu.enable_cpu_backend() is True
    from rlp_megatron.backends import maybe_enable_cpu_backend

    assert maybe_enable_cpu_backend() is True
    assert modes() == mode
    assert torch.cuda.current_device is current_device
    assert cpu.cpu_backend_enabled()


CPU_OK_ARGS = dict(transformer_impl="local", sequence_parallel=False, fp16=False, bf16=False,
                   tp_comm_overlap=False, use_flash_attn=False, cuda_graph_impl="none",
                   gradient_accumulation_fusion=False)


def test_check_cpu_args_accepts_cpu_flags():
    assert cpu.check_cpu_args(argparse.Namespace(**CPU_OK_ARGS)) is None
    # bf16 runs on CPU (what users run on GPUs; tests/test_device_paths.py)
    assert cpu.check_cpu_args(argparse.Namespace(**{**CPU_OK_ARGS, "bf16": True})) is None


@pytest.mark.parametrize("override,flag", [
    ({"fp16": True}, "--fp16"),
    ({"transformer_impl": "transformer_engine"}, "--transformer-impl transformer_engine"),
    ({"tp_comm_overlap": True}, "--tp-comm-overlap"),
    ({"use_flash_attn": True}, "--use-flash-attn"),
    ({"cuda_graph_impl": "local"}, "--cuda-graph-impl"),
    ({"gradient_accumulation_fusion": True}, "--no-gradient-accumulation-fusion"),
])
def test_check_cpu_args_refuses_in_one_line_naming_the_flag(override, flag):
    with pytest.raises(SystemExit) as exc:
        cpu.check_cpu_args(argparse.Namespace(**{**CPU_OK_ARGS, **override}))
    message = exc.value.code
    assert isinstance(message, str) and "\n" not in message
    assert flag in message


def test_train_entry_point_refuses_fp16_before_building_anything():
    proc = subprocess.run(
        [sys.executable, "-m", "rlp_megatron.train", *TINY_GPT, *TRAIN_FLAGS, "--train-iters", "1",
         "--fp16"],
        cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlp_megatron: --fp16 is not supported on the CPU backend"), last
    assert "Traceback" not in proc.stderr
    assert "building GPT model" not in proc.stdout


# --------------------------------------------------------------------------------------------
# What `import rlp_megatron` does in a fresh process


def test_import_is_light_and_pulls_no_gpu_kernel_packages():
    code = (
        "import time, sys, json\n"
        "t = time.perf_counter()\n"
        "import rlp_megatron\n"
        "dt = time.perf_counter() - t\n"
        "from rlp_megatron.backends import cpu\n"
        f"banned = {BANNED_MODULES!r}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in banned)\n"
        "print(json.dumps({'seconds': dt, 'loaded': loaded, 'enabled': cpu.cpu_backend_enabled()}))\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _last_json_line(proc.stdout)
    print(f"import rlp_megatron: {result['seconds']:.2f} s")
    assert result["loaded"] == []
    assert result["enabled"] is True


def test_backend_stays_off_when_cuda_is_available():
    code = (
        "import json, sys, torch\n"
        "original_current_device = torch.cuda.current_device\n"
        "torch.cuda.is_available = lambda: True\n"
        "import rlp_megatron\n"
        "from rlp_megatron.backends import cpu\n"
        "stack = torch.overrides._get_current_function_mode_stack()\n"
        "print(json.dumps({'enabled': cpu.cpu_backend_enabled(),\n"
        "                  'modes': [type(m).__name__ for m in stack],\n"
        "                  'cuda_untouched': torch.cuda.current_device is original_current_device,\n"
        "                  'megatron_imported': 'megatron.training' in sys.modules}))\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _last_json_line(proc.stdout)
    assert result == {"enabled": False, "modes": [], "cuda_untouched": True,
                      "megatron_imported": False}
