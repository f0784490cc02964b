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
