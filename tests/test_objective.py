"""Claims about rlp_megatron.objective (RLP eq. 5, 7, 8, Alg. 1 l.14-15); pure torch, milliseconds."""

import math

import pytest
import torch

from rlp_megatron.objective import (
    RLPObjectiveConfig,
    clipped_surrogate_loss,
    ema_closed_form,
    ema_update_,
    group_advantages,
    information_gain,
    per_thought_surrogate,
    prefix_match_reward,
)


def one_token_thoughts(ratios, advantages):
    """N single-token thoughts with the given ρ (old_logp = 0, logp = log ρ)."""
    logp = torch.tensor([[math.log(r)] for r in ratios], dtype=torch.float64, requires_grad=True)
    old = torch.zeros_like(logp)
    mask = torch.ones_like(logp, dtype=torch.bool)
    return logp, old, torch.tensor(advantages, dtype=torch.float64), mask


# --------------------------------------------------------------------------------------------------
# reward and advantage


def test_rpt_reward_is_one_only_for_an_exact_match_of_all_n_tokens():
    truth = torch.tensor([[5, 6, 7]])
    cases = {  # prediction -> reward
        (5, 6, 7): 1.0,  # match
        (9, 6, 7): 0.0,  # mismatch at the first token
        (5, 6, 9): 0.0,  # a partial prefix (2 of 3 tokens) is not a match
        (5, 9, 7): 0.0,  # diverges, then agrees again: still 0
    }
    for pred, reward in cases.items():
        assert prefix_match_reward(torch.tensor([pred]), truth).tolist() == [reward], pred
    # one token (RPT's next-token reasoning): the sampled token is the text's next token
    assert prefix_match_reward(torch.tensor([[4], [3]]), torch.tensor([[4], [4]])).tolist() == [
        1.0, 0.0]
    # the text ends inside the window: only the tokens it has are compared
    assert prefix_match_reward(torch.tensor([[5, 6, 1]]), torch.tensor([[5, 6, -1]])).tolist() == [1.0]
    assert prefix_match_reward(torch.tensor([[5, 0, 1]]), torch.tensor([[5, 6, -1]])).tolist() == [0.0]
    # [B, G, n] → [B, G], fp32, no gradient needed
    out = prefix_match_reward(torch.zeros(2, 4, 2, dtype=torch.long), torch.zeros(2, 4, 2,
                                                                                dtype=torch.long))
    assert out.shape == (2, 4) and out.dtype == torch.float32 and bool((out == 1).all())
    with pytest.raises(ValueError, match="one shape"):
        prefix_match_reward(torch.zeros(2, 3), torch.zeros(2, 2))


def test_paper_worked_example_advantages():
    # v2 §9: r = [-0.80, -0.60, -0.50, -0.30], r̄ = -0.55, A = (4/3)(r - r̄)
    r = torch.tensor([[-0.80, -0.60, -0.50, -0.30]])
    a = group_advantages(r)
    assert a.shape == (1, 4)
    expected = torch.tensor([[-0.3333, -0.0667, 0.0667, 0.3333]])
    assert torch.allclose(a, expected, atol=1e-4, rtol=0)
    assert abs(a.sum().item()) < 1e-6
    # the "least bad" thought (-0.30 < 0, a negative reward) still gets a positive advantage
    assert a[0, 3].item() > 0


def test_advantage_equals_rloo_leave_one_out():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 6, generator=g, dtype=torch.float64)
    a = group_advantages(r)
    G = r.shape[1]
    loo = r - (r.sum(dim=1, keepdim=True) - r) / (G - 1)
    assert torch.allclose(a, loo, atol=1e-12, rtol=0)
    assert torch.allclose(a.sum(dim=1), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_advantages_use_no_std_division():
    # scaling rewards by 10 scales advantages by 10 (a std-normalised advantage would not change)
    r = torch.tensor([[0.0, 1.0, 3.0]], dtype=torch.float64)
    a = group_advantages(r)
    # r̄ = 4/3, G/(G-1) = 3/2: A = 1.5 * [-4/3, -1/3, 5/3] = [-2, -0.5, 2.5]
    assert torch.allclose(a, torch.tensor([[-2.0, -0.5, 2.5]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(group_advantages(10 * r), 10 * a, atol=1e-12)


def test_group_advantages_are_detached():
    r = torch.tensor([[1.0, 2.0], [3.0, 5.0]], requires_grad=True)
    a = group_advantages(r)
    assert not a.requires_grad
    assert torch.equal(a, torch.tensor([[-1.0, 1.0], [-2.0, 2.0]]))


def test_information_gain_broadcasts_one_teacher_score_per_context():
    s_pred = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]])
    expected = torch.tensor([[1.0, 0.0, -1.0], [1.5, 1.75, -2.0]])  # s_ema = [-2, -2]
    for s_ema in (torch.tensor([-2.0, -2.0]), torch.tensor([[-2.0], [-2.0]])):
        assert torch.equal(information_gain(s_pred, s_ema), expected)
    r = information_gain(s_pred, torch.tensor([-2.0, 1.0]))
    assert torch.equal(r, torch.tensor([[1.0, 0.0, -1.0], [-1.5, -1.25, -5.0]]))


def test_information_gain_is_fp32_and_detached_for_bf16_inputs():
    s_pred = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16, requires_grad=True)
    r = information_gain(s_pred, torch.tensor([-0.5], dtype=torch.bfloat16))
    assert r.dtype == torch.float32 and not r.requires_grad
    assert torch.equal(r, torch.tensor([[-0.5, -1.5]]))


@pytest.mark.parametrize("s_pred_shape,s_ema_shape", [((2, 3), (3,)), ((2, 3), (2, 3)), ((2, 3), (1, 2)),
                                                      ((6,), (6,)), ((2, 3), (2, 1, 1))])
def test_information_gain_rejects_mismatched_shapes(s_pred_shape, s_ema_shape):
    with pytest.raises(ValueError, match=r"s_(pred|ema) must be"):
        information_gain(torch.zeros(s_pred_shape), torch.zeros(s_ema_shape))


def test_s_ema_cancels_in_group_advantages():
    s_pred = torch.tensor([[-0.80, -0.60, -0.50, -0.30], [-2.0, -1.0, -4.0, -3.0]], dtype=torch.float64)
    a_no_teacher = group_advantages(s_pred)
    for s_ema in ([-7.0, 0.25], [3.0, -100.0]):
        r = information_gain(s_pred, torch.tensor(s_ema, dtype=torch.float64))
        assert not torch.allclose(r, s_pred)
        assert torch.allclose(group_advantages(r), a_no_teacher, atol=1e-12, rtol=0)


def test_group_size_below_two_raises():
    with pytest.raises(ValueError, match="group size G=1"):
        group_advantages(torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"rewards must be \[B, G\]"):
        group_advantages(torch.zeros(4))


def test_valid_mask_rescales_to_valid_thoughts_and_zeroes_invalid():
    # thought 3 did not close </think>; its reward is garbage and must not be read
    r = torch.tensor([[-0.80, -0.60, float("nan"), -0.30]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False, True]])
    a = group_advantages(r, valid)
    # G_v = 3, mean = (-0.8 - 0.6 - 0.3)/3 = -17/30, A = 1.5 * (r - mean) = [-0.35, -0.05, 0, 0.40]
    assert torch.allclose(a, torch.tensor([[-0.35, -0.05, 0.0, 0.40]], dtype=torch.float64), atol=1e-12)
    assert a[0, 2].item() == 0.0
    # still the leave-one-out advantage among the valid thoughts
    assert torch.allclose(a[0, 0], r[0, 0] - (r[0, 1] + r[0, 3]) / 2, atol=1e-12)


def test_valid_mask_groups_with_fewer_than_two_valid_get_zero():
    r = torch.tensor([[1.0, float("-inf"), 5.0], [2.0, 4.0, 9.0], [float("nan")] * 3])
    valid = torch.tensor([[True, False, False], [True, True, False], [False, False, False]])
    a = group_advantages(r, valid)
    # group 0: one valid -> no baseline -> zeros; group 1: G_v = 2, A = 2 * (r - 3) = [-2, 2, 0]
    assert torch.equal(a, torch.tensor([[0.0, 0.0, 0.0], [-2.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))


def test_all_valid_mask_equals_no_mask():
    r = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(group_advantages(r, torch.ones(3, 5, dtype=torch.bool)), group_advantages(r),
                          atol=1e-6, rtol=0)


def test_valid_mask_must_be_bool_and_same_shape():
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        group_advantages(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        group_advantages(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# clipped surrogate


def test_hand_computed_clipped_terms_symmetric_eps():
    # eps 0.2/0.2, clip range [0.8, 1.2]; per-token term -min(ρA, clip(ρ)A):
    #   ρ=1.5, A=+1: -min(1.5, 1.2)   = -1.2   clipped (A>0, ρ>1.2)
    #   ρ=0.5, A=+1: -min(0.5, 0.8)   = -0.5   not clipped
    #   ρ=1.5, A=-1: -min(-1.5, -1.2) = +1.5   not clipped
    #   ρ=0.5, A=-1: -min(-0.5, -0.8) = +0.8   clipped (A<0, ρ<0.8)
    #   ρ=1.1, A=+2: -min(2.2, 2.2)   = -2.2   not clipped (inside the range)
    logp, old, adv, mask = one_token_thoughts([1.5, 0.5, 1.5, 0.5, 1.1], [1.0, 1.0, -1.0, -1.0, 2.0])
    per, has, _ = per_thought_surrogate(logp, old, adv, mask, 0.2, 0.2)
    assert torch.allclose(per, torch.tensor([-1.2, -0.5, 1.5, 0.8, -2.2], dtype=torch.float64), atol=1e-12)
    assert has.tolist() == [True] * 5
    loss, stats = clipped_surrogate_loss(logp, old, adv, mask, 0.2, 0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5, abs=1e-12)  # -0.32
    assert stats["clip_frac"].item() == pytest.approx(2 / 5, abs=1e-12)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 5, abs=1e-12)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 5, abs=1e-12)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5, abs=1e-12)  # 1.02
    assert stats["num_thoughts"].item() == 5 and stats["num_tokens"].item() == 5
    # clipped tokens get zero gradient; unclipped ones d(-ρA)/dlogp / N = -ρA/5
    loss.backward()
    expected_grad = torch.tensor([[0.0], [-0.5 / 5], [1.5 / 5], [0.0], [-2.2 / 5]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected_grad, atol=1e-12)
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[3, 0].item() == 0.0


def test_hand_computed_clipped_terms_asymmetric_eps():
    # eps_low=0.1, eps_high=0.3, clip range [0.9, 1.3]:
    #   ρ=1.5, A=+1: -min(1.5, 1.3)   = -1.3   clipped
    #   ρ=0.5, A=-1: -min(-0.5, -0.9) = +0.9   clipped
    #   ρ=1.25, A=+1: -min(1.25, 1.25) = -1.25 not clipped (would be with eps_high=0.2)
    #   ρ=0.85, A=-2: -min(-1.7, -1.8) = +1.8  clipped (A<0, ρ<0.9)
    logp, old, adv, mask = one_token_thoughts([1.5, 0.5, 1.25, 0.85], [1.0, -1.0, 1.0, -2.0])
    per, _, sums = per_thought_surrogate(logp, old, adv, mask, eps_low=0.1, eps_high=0.3)
    assert torch.allclose(per, torch.tensor([-1.3, 0.9, -1.25, 1.8], dtype=torch.float64), atol=1e-12)
    assert sums["num_clipped_high"].item() == 1 and sums["num_clipped_low"].item() == 2
    _, stats = clipped_surrogate_loss(logp, old, adv, mask, eps_low=0.1, eps_high=0.3)
    assert stats["clip_frac"].item() == pytest.approx(3 / 4, abs=1e-12)


def test_zero_advantage_never_clips():
    logp, old, adv, mask = one_token_thoughts([3.0, 0.1], [0.0, 0.0])
    loss, stats = clipped_surrogate_loss(logp, old, adv, mask)
    assert loss.item() == 0.0 and stats["clip_frac"].item() == 0.0


def test_on_policy_ratio_is_one_and_clip_inactive():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([2.0, -2.0])
    _, stats = clipped_surrogate_loss(logp, logp.clone(), adv, mask)
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_frac"].item() == 0.0
    assert stats["num_tokens"].item() == 5


def test_loss_is_mean_of_per_thought_means_not_token_mean():
    # thought 0: 1 token, ρ=1.1, A=+1 -> -1.1
    # thought 1: 3 tokens, ρ=[0.9, 1.0, 1.1], A=-2 -> [+1.8, +2.0, +2.2], mean +2.0
    # loss = (-1.1 + 2.0)/2 = 0.45; the token mean would be (-1.1 + 1.8 + 2.0 + 2.2)/4 = 1.225
    pad = 30.0  # garbage in the padding must not matter
    logp = torch.tensor([[math.log(1.1), pad, pad], [math.log(0.9), 0.0, math.log(1.1)]], dtype=torch.float64)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, stats = clipped_surrogate_loss(logp, torch.zeros_like(logp), adv, mask)
    assert loss.item() == pytest.approx(0.45, abs=1e-12)
    assert abs(loss.item() - 1.225) > 0.5
    assert stats["num_thoughts"].item() == 2 and stats["num_tokens"].item() == 4
    assert stats["ratio_mean"].item() == pytest.approx((1.1 + 0.9 + 1.0 + 1.1) / 4, abs=1e-12)


def test_zero_length_thoughts_excluded_from_mean():
    logp = torch.tensor([[math.log(1.1), 0.0], [0.0, 0.0], [math.log(0.9), math.log(0.9)]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    adv = torch.tensor([1.0, 5.0, 1.0], dtype=torch.float64)
    per, has, _ = per_thought_surrogate(logp, torch.zeros_like(logp), adv, mask)
    assert has.tolist() == [True, False, True]
    assert torch.allclose(per, torch.tensor([-1.1, 0.0, -0.9], dtype=torch.float64), atol=1e-12)
    loss, stats = clipped_surrogate_loss(logp, torch.zeros_like(logp), adv, mask)
    # (-1.1 - 0.9)/2 = -1.0, not (-1.1 + 0 - 0.9)/3
    assert loss.item() == pytest.approx(-1.0, abs=1e-12)
    assert stats["num_thoughts"].item() == 2


def test_no_tokens_at_all_gives_zero_loss_with_grad_path():
    logp = torch.full((2, 3), float("nan"), requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, stats = clipped_surrogate_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask)
    assert loss.item() == 0.0 and loss.requires_grad
    assert stats["num_thoughts"].item() == 0 and stats["num_tokens"].item() == 0
    assert stats["clip_frac"].item() == 0.0 and stats["ratio_mean"].item() == 1.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))


def test_gradient_reaches_only_thought_tokens():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 6, generator=g)).requires_grad_(True)
    with torch.no_grad():
        logp[0, 4:] = float("-inf")  # padding may hold anything, even -inf / nan
        logp[1, 5] = float("nan")
    old = (logp.detach() - 0.05 * torch.rand(4, 6, generator=g)).requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 0],
                         [1, 0, 0, 0, 0, 0],
                         [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    loss, _ = clipped_surrogate_loss(logp, old, adv, mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.equal(logp.grad[~mask], torch.zeros(int((~mask).sum())))
    assert (logp.grad[mask] != 0).all()
    assert old.grad is None and adv.grad is None


def test_on_policy_gradient_equals_rloo_reinforce():
    # logp from a tiny linear "policy"; ρ ≡ 1, so ∇L = -(1/N) Σ_i A_i/|c_i| Σ_u ∇log π(ℓ_u)
    torch.manual_seed(0)
    B, G, U, V, D = 2, 3, 5, 7, 4
    N = B * G
    w = torch.randn(D, V, dtype=torch.float64, requires_grad=True)
    h = torch.randn(N, U, D, dtype=torch.float64)
    tokens = torch.randint(0, V, (N, U))
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = torch.arange(U)[None, :] < lengths[:, None]

    def token_logp():
        return torch.log_softmax(h @ w, dim=-1).gather(-1, tokens[..., None])[..., 0]

    adv = group_advantages(torch.randn(B, G, dtype=torch.float64))
    logp = token_logp()
    loss, stats = clipped_surrogate_loss(logp, logp.detach(), adv, mask)
    (grad_ours,) = torch.autograd.grad(loss, w)

    lp = token_logp()
    a = adv.reshape(N)
    reinforce = -(1.0 / N) * sum(a[i] / lengths[i] * lp[i, : lengths[i]].sum() for i in range(N))
    (grad_ref,) = torch.autograd.grad(reinforce, w)
    assert torch.allclose(grad_ours, grad_ref, atol=1e-12, rtol=0)
    assert grad_ref.abs().max() > 1e-3
    assert stats["clip_frac"].item() == 0.0


def test_grouped_and_flat_shapes_agree():
    g = torch.Generator().manual_seed(3)
    B, G, U = 2, 3, 4
    logp = -torch.rand(B, G, U, generator=g, dtype=torch.float64)
    old = logp - 0.3 * torch.randn(B, G, U, generator=g, dtype=torch.float64)
    mask = torch.rand(B, G, U, generator=g) > 0.3
    adv = torch.randn(B, G, generator=g, dtype=torch.float64)
    loss3, s3 = clipped_surrogate_loss(logp, old, adv, mask)
    flat = (logp.reshape(6, U), old.reshape(6, U))
    for a in (adv, adv.reshape(6)):
        loss2, s2 = clipped_surrogate_loss(*flat, a, mask.reshape(6, U))
        assert loss2.item() == loss3.item()
        assert all(torch.equal(s2[k], s3[k]) for k in s3)
    loss3b, _ = clipped_surrogate_loss(logp, old, adv.reshape(6), mask)
    assert loss3b.item() == loss3.item()
    assert s3["clip_frac"].item() > 0  # the test exercises clipping


def test_float_mask_and_bf16_logp_compute_in_fp32():
    logp = torch.tensor([[math.log(1.5), 0.0]], dtype=torch.bfloat16, requires_grad=True)
    loss, stats = clipped_surrogate_loss(logp, torch.zeros(1, 2, dtype=torch.bfloat16),
                                         torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)  # ρ≈1.5 (bf16), clipped to 1.2
    assert stats["num_tokens"].item() == 1


@pytest.mark.parametrize("logp_shape,old_shape,adv_shape,mask_shape,match", [
    ((4, 5), (4, 5), (3,), (4, 5), "advantages must be one per thought"),
    ((2, 3, 5), (2, 3, 5), (3, 2), (2, 3, 5), "advantages must be one per thought"),
    ((2, 3, 5), (2, 3, 5), (2, 3, 1), (2, 3, 5), "advantages must be one per thought"),
    ((4, 5), (4, 4), (4,), (4, 5), "old_logp shape"),
    ((4, 5), (4, 5), (4,), (4, 1), "mask shape"),
    ((20,), (20,), (1,), (20,), r"logp must be \[N, U\]"),
])
def test_surrogate_rejects_bad_shapes(logp_shape, old_shape, adv_shape, mask_shape, match):
    with pytest.raises(ValueError, match=match):
        clipped_surrogate_loss(torch.zeros(logp_shape), torch.zeros(old_shape), torch.zeros(adv_shape),
                               torch.ones(mask_shape, dtype=torch.bool))


def test_grouped_advantages_pair_with_flat_logp_row_major():
    # [B, G] advantages with flat [N, U] logp, N = B·G: thought n = b·G + g; on-policy term = -A
    logp, old, _, mask = one_token_thoughts([1.0, 1.0, 1.0, 1.0], [0.0] * 4)
    adv = torch.tensor([[1.0, -2.0], [3.0, -4.0]], dtype=torch.float64)
    per, _, _ = per_thought_surrogate(logp, old, adv, mask)
    assert torch.equal(per, torch.tensor([-1.0, 2.0, -3.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("eps_low,eps_high,flag", [(1.0, 0.2, "--rlp-clip-eps-low"),
                                                   (-0.1, 0.2, "--rlp-clip-eps-low"),
                                                   (0.2, -0.01, "--rlp-clip-eps-high"),
                                                   (0.2, float("inf"), "--rlp-clip-eps-high")])
def test_surrogate_rejects_bad_eps(eps_low, eps_high, flag):
    logp, old, adv, mask = one_token_thoughts([1.0], [1.0])
    with pytest.raises(ValueError, match=flag):
        clipped_surrogate_loss(logp, old, adv, mask, eps_low, eps_high)


# --------------------------------------------------------------------------------------------------
# EMA teacher and config


def test_ema_update_twice_equals_closed_form():
    tau = 0.9
    theta0, theta1, theta2 = torch.tensor([0.0, 10.0]), torch.tensor([1.0, 20.0]), torch.tensor([2.0, -5.0])
    phi = theta0.clone()
    ema_update_([phi], [theta1], tau)
    # φ_1 = 0.9 θ_0 + 0.1 θ_1 = [0.1, 11.0]
    assert torch.allclose(phi, torch.tensor([0.1, 11.0]), atol=1e-6, rtol=0)
    ema_update_([phi], [theta2], tau)
    # φ_2 = 0.81 θ_0 + 0.09 θ_1 + 0.1 θ_2 = [0.29, 8.1 + 1.8 - 0.5] = [0.29, 9.4]
    assert torch.allclose(phi, torch.tensor([0.29, 9.4]), atol=1e-6, rtol=0)
    assert torch.allclose(ema_closed_form(theta0, [theta1, theta2], tau), torch.tensor([0.29, 9.4]),
                          atol=1e-6, rtol=0)


def test_ema_update_matches_closed_form_over_many_steps_with_bf16_params():
    torch.manual_seed(0)
    tau = 0.999
    theta0 = torch.randn(3, 4)
    history = [torch.randn(3, 4).to(torch.bfloat16) for _ in range(50)]
    phi, bias = theta0.clone(), torch.zeros(4)
    for th in history:
        ema_update_([phi, bias], [th, th[0]], tau)
    assert phi.dtype == torch.float32
    assert torch.allclose(phi, ema_closed_form(theta0, history, tau), atol=1e-5, rtol=0)
    assert torch.allclose(bias, ema_closed_form(torch.zeros(4), [h[0] for h in history], tau), atol=1e-6, rtol=0)
    # after k steps the initial model keeps weight τ^k
    assert torch.allclose(ema_closed_form(torch.ones(1), [torch.zeros(1)] * 200, tau),
                          torch.tensor([0.999 ** 200]), atol=1e-7, rtol=0)


def test_ema_update_rejects_bf16_shadow_and_mismatches():
    with pytest.raises(ValueError, match="must be fp32"):
        ema_update_([torch.zeros(2, dtype=torch.bfloat16)], [torch.zeros(2)], 0.999)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.999)
    with pytest.raises(ValueError, match="has 2 tensors"):
        ema_update_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)], 0.999)
    with pytest.raises(ValueError, match="--rlp-ema-decay"):
        ema_update_([torch.zeros(2)], [torch.zeros(2)], 1.5)


def test_config_defaults_follow_paper_and_trl():
    cfg = RLPObjectiveConfig()
    assert (cfg.group_size, cfg.clip_eps_low, cfg.clip_eps_high, cfg.ema_decay) == (16, 0.2, 0.2, 0.999)
    assert cfg.validate() is cfg


@pytest.mark.parametrize("field,value,flag", [
    ("group_size", 1, "--rlp-group-size"),
    ("group_size", 4.0, "--rlp-group-size"),
    ("group_size", True, "--rlp-group-size"),
    ("clip_eps_low", 1.0, "--rlp-clip-eps-low"),
    ("clip_eps_low", -0.2, "--rlp-clip-eps-low"),
    ("clip_eps_high", -0.2, "--rlp-clip-eps-high"),
    ("clip_eps_high", float("nan"), "--rlp-clip-eps-high"),
    ("ema_decay", 1.0001, "--rlp-ema-decay"),
    ("ema_decay", -0.1, "--rlp-ema-decay"),
])
def test_config_validate_names_the_flag(field, value, flag):
    cfg = RLPObjectiveConfig(**{field: value})
    with pytest.raises(ValueError, match=flag):
        cfg.validate()


def test_config_accepts_boundary_values():
    for cfg in (RLPObjectiveConfig(group_size=2, clip_eps_low=0.0, clip_eps_high=0.0, ema_decay=0.0),
                RLPObjectiveConfig(clip_eps_low=0.99, clip_eps_high=10.0, ema_decay=1.0)):
        assert cfg.validate() is cfg
