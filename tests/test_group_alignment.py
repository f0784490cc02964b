"""Groups stay whole whatever the sample count an RLP segment starts from, and the console line
averages each metric over the iterations that logged it.

An NTP run of 3 iterations at --global-batch-size 6 leaves consumed samples = 18, not a multiple
of G = 4. Before the fix the first RLP step's rows 18..25 were cut into blocks [18..21],
[22..25] that mix groups 4, 5 and 6 (advantages across two contexts, a wrong rlp/info_gain).
Now the RLP segment starts at sample 20 (samples 18, 19 skipped and logged), and every group of
every step is G thoughts of one context whose advantages sum to 0.
"""

import re

import pytest
import torch

from harness import TINY_GPT, TRAIN_FLAGS, read_jsonl, torchrun

pytestmark = pytest.mark.slow

G = 4
RLP = ["--objective", "rlp", "--rlp-group-size", str(G), "--rlp-thought-length", "8",
       "--rlp-context-length", "32", "--rlp-min-context", "4", "--global-batch-size", "8"]


def _train(out, *flags):
    return torchrun(1, ["-m", "rlp_megatron.train", *TINY_GPT, *TRAIN_FLAGS,
                        "--save", str(out / "ckpt"), "--load", str(out / "ckpt"),
                        "--rlp-metrics-file", str(out / "metrics.jsonl"),
                        "--override-opt-param-scheduler", *flags])


@pytest.fixture(scope="module")
def switched(tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    _train(out, "--objective", "ntp", "--global-batch-size", "6", "--train-iters", "3",
           "--save-interval", "3")
    # RLP from consumed = 18, interleaved with NTP (iterations 4, 6 NTP; 5, 7 RLP), console
    # lines every 2 iterations.
    proc = _train(out, *RLP, "--train-iters", "7", "--save-interval", "7", "--rlp-ntp-every", "2",
                  "--log-interval", "2", "--rlp-dump-rollouts", str(out / "rollouts"))
    rollouts = [torch.load(p) for p in sorted((out / "rollouts").glob("iter*_dp0.pt"))]
    return {"stdout": proc.stdout, "rollouts": rollouts,
            "metrics": read_jsonl(out / "metrics.jsonl")}


def test_rlp_after_ntp_skips_to_a_group_boundary_and_says_so(switched):
    assert ("consumed samples 18 is not a multiple of --rlp-group-size 4: skipping samples "
            "18..19") in switched["stdout"]
    first = switched["rollouts"][0]
    # Iteration 4 (NTP) read samples 20..27, so the first RLP step (iteration 5) reads 28..35.
    assert sorted(first["rows"]) == list(range(28, 36))


def test_every_group_is_g_thoughts_of_one_context_with_zero_sum_advantages(switched):
    assert len(switched["rollouts"]) == 2  # iterations 5 and 7
    for r in switched["rollouts"]:
        groups = {}
        for row, group, prompt, target, adv in zip(r["rows"], r["groups"], r["prompts"],
                                                   r["targets"], r["advantages"].tolist()):
            assert group == row // G
            groups.setdefault(group, []).append((tuple(prompt), target, adv))
        for group, members in groups.items():
            assert len(members) == G, (group, len(members))
            assert len({(p, t) for p, t, _ in members}) == 1  # one context and target
            assert abs(sum(a for _, _, a in members)) < 1e-5
        assert any(abs(a) > 1e-4 for a in r["advantages"].tolist())  # not trivially zero


def _console(stdout, iteration):
    line = next(l for l in stdout.splitlines() if re.search(rf"iteration\s+{iteration}/", l))
    return {k: float(v) for k, v in re.findall(r" ([\w/ ]+?): ([-+\d.E]+) \|", line)}


def test_console_averages_each_key_over_the_iterations_that_logged_it(switched):
    """Iterations 4..7 alternate NTP, RLP, NTP, RLP. Megatron's line at iteration 6 covers 4, 5
    and 6 (its first line after a start does not reset the sums) and divided every key by 3. Now
    lm loss is the mean of iterations 4 and 6, and the rlp/* keys are iteration 5's values
    (negative ones too)."""
    by_iter = {m["iteration"]: m for m in switched["metrics"]}
    line = _console(switched["stdout"], 6)
    assert line["lm loss"] == pytest.approx((by_iter[4]["lm loss"] + by_iter[6]["lm loss"]) / 2,
                                            rel=1e-5)
    for key in ("rlp/s_pred", "rlp/s_ema", "rlp/thought_len", "rlp/info_gain"):
        assert line[key] == pytest.approx(by_iter[5][key], rel=1e-5, abs=1e-6), key
    assert by_iter[5]["rlp/s_pred"] < 0
