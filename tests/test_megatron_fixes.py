"""Fix 6 of rlp_megatron.megatron_fixes: relaunching with another --lr keeps the Adam state."""

import pytest

from rlp_megatron import megatron_fixes


def _groups(lr, wd_mult=1.0, decoupled=False):
    return [
        {"params": [0, 1], "max_lr": lr, "min_lr": lr, "wd_mult": wd_mult, "lr_mult": 1.0,
         "is_expert_parallel": False, "is_decoupled_lr": decoupled},
        {"params": [2], "max_lr": lr, "min_lr": lr, "wd_mult": 0.0, "lr_mult": 1.0,
         "is_expert_parallel": False, "is_decoupled_lr": decoupled},
    ]


def test_megatron_refuses_saved_groups_after_an_lr_change_and_alignment_fixes_it():
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    current, saved = _groups(1e-6), _groups(1e-3)
    with pytest.raises(ValueError, match="Could not find parameter group"):
        MegatronOptimizer._filter_and_reorder_param_groups(current, [dict(g) for g in saved])
    assert megatron_fixes.align_saved_param_groups(current, saved) == 2
    matched = MegatronOptimizer._filter_and_reorder_param_groups(current, saved)
    assert [g["max_lr"] for g in matched] == [1e-6, 1e-6]  # the command line's LR wins
    assert [g["wd_mult"] for g in matched] == [1.0, 0.0]  # each group found its own twin


def test_alignment_never_pairs_structurally_different_or_ambiguous_groups():
    current = _groups(1e-6, decoupled=True)
    saved = _groups(1e-3, decoupled=False)
    assert megatron_fixes.align_saved_param_groups(current, saved) == 0
    assert saved[0]["max_lr"] == 1e-3
    twins = [dict(_groups(1e-3)[0]), dict(_groups(1e-3)[0])]  # two saved groups look alike
    assert megatron_fixes.align_saved_param_groups(_groups(1e-6), twins) == 0


def test_startup_uses_the_wheels_dataset_helpers_on_any_device(tmp_path):
    """Fix 7: Megatron's rank 0 runs `make -C megatron/core/datasets` in initialize_megatron; the
    wheel has the compiled helpers but no Makefile, so a GPU run exited before training. Runs
    with the CPU backend off (RLP_MEGATRON_CPU_BACKEND=0): the device-independent path a GPU
    takes, and Megatron's own call site."""
    import subprocess
    import sys

    code = (
        "import rlp_megatron\n"
        "from rlp_megatron.backends import cpu\n"
        "assert not cpu.cpu_backend_enabled()\n"
        "from rlp_megatron import megatron_fixes\n"
        "megatron_fixes.install()\n"
        "from megatron.core.datasets.utils import compile_helpers\n"  # as initialize.py does
        "compile_helpers()\n"
        "from megatron.core.datasets import helpers_cpp\n"
        "print('helpers ok', helpers_cpp.__name__)\n"
    )
    env = {**__import__("os").environ, "RLP_MEGATRON_CPU_BACKEND": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "helpers ok" in proc.stdout
