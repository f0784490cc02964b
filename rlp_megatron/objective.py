"""The RLP objective (Algorithm 1 of "RLP: Reinforcement as a Pretraining Objective", arXiv 2510.01265).

Pure torch: no Megatron, no other rlp_megatron module. Everything the training step needs to turn
log-probabilities into a loss lives here and tests in milliseconds.

One network θ plays two roles. At a random position t of a document it samples a thought
c_t ~ π_θ(· | x_<t) between <think> and </think>, then scores the observed next token x_t after
</think>. An EMA copy φ of the network scores x_t without any thought. For each of B contexts we sample
G thoughts c^(1..G) from the behaviour snapshot θ_old (= θ at the start of the iteration).

Reward: information gain of the thought about x_t (eq. 3-5), a constant (no gradient):

    S_pred(c) = log p_θ(x_t | x_<t, c)            S_EMA = log p̄_φ(x_t | x_<t)
    r(c)      = S_pred(c) − S_EMA                                                  -> information_gain

Group-relative advantage (eq. 7), no division by the standard deviation:

    r̄ = (1/G) Σ_j r(c^(j))          A^(i) = G/(G−1) · (r(c^(i)) − r̄)              -> group_advantages

    G/(G−1)(r_i − r̄) = r_i − (1/(G−1)) Σ_{j≠i} r_j, i.e. exactly the RLOO leave-one-out advantage,
    and Σ_i A^(i) = 0.

Clipped surrogate over the thought tokens ℓ_u only (eq. 8); old log-probs and A are constants:

    ρ_u^(i)   = exp(log π_θ(ℓ_u^(i) | x_<t, ℓ_<u^(i)) − log π_θold(ℓ_u^(i) | x_<t, ℓ_<u^(i)))
    L^(i)     = −(1/|c^(i)|) Σ_u min(ρ_u^(i) A^(i), clip(ρ_u^(i), 1−ε_low, 1+ε_high) A^(i))
                                                                                   -> per_thought_surrogate
    L(θ)      = (1/(B·G)) Σ_b Σ_i L^(b,i)        (Alg. 1 line 14)                -> clipped_surrogate_loss

EMA teacher, after every optimizer step (Alg. 1 line 15), φ ← θ at the first batch:

    φ ← τ φ + (1−τ) θ,   τ = 0.999                                                -> ema_update_
    closed form from φ_0 = θ_0:  φ_k = τ^k θ_0 + Σ_{j=1..k} (1−τ) τ^{k−j} θ_j      -> ema_closed_form

Choices the paper leaves open, what we chose, and why:

1. ε_low, ε_high (--rlp-clip-eps-low/--rlp-clip-eps-high): never given. We use 0.2/0.2, the TRL
   GRPOTrainer default (the paper's RL backbone is Open-R1/TRL). With one optimizer step per rollout
   batch (our default, and Alg. 1 as written: θ_old ← θ every iteration) ρ ≡ 1 at the update, the clip
   never binds, and the gradient is the on-policy REINFORCE/RLOO gradient
   −(1/BG) Σ_{b,i} (A^(b,i)/|c^(b,i)|) Σ_u ∇log π_θ(ℓ_u^(b,i) | ...). The clip only matters if a rollout
   batch is split over several optimizer steps, or if the sampler's log-probs differ from the trainer's
   (precision, kernels); clip_frac and ratio_mean make that visible.

2. Aggregation: the paper's per-thought length-normalised mean, then a plain mean over all B·G thoughts
   (the original GRPO "sample-level" aggregation). Not chosen: DAPO-style token-level mean (Σ over all
   tokens / total token count), which weights long thoughts more; the paper's equations do not use it.
   For data parallelism and micro-batching, per_thought_surrogate returns the per-thought losses so the
   caller sums them over a micro-batch and divides by the *global* number of counted thoughts; that
   equals the mean over all B·G thoughts independently of how they were split.

3. Zero-length thoughts (no masked token; Alg. 1 requires |c| ≥ 1, so this should only come from a
   sampler that emitted </think> at once or from padding rows): 1/|c| is undefined, so they are excluded
   from the mean over thoughts; the denominator counts only thoughts with ≥ 1 token. If no thought has a
   token the loss is an exact 0 that still has a grad path, so every data-parallel rank runs backward.

4. No KL term (the paper sets β = 0 in all runs; β > 0 was worse), no entropy bonus (not mentioned), and
   no next-token-prediction term (§2: "our training does not include a standard NTP loss term").
   Gradient reaches only thought tokens: not the prompt, not the context, not x_t (the reasoned scorer
   p_θ(x_t | ...) gets no direct gradient).

5. S_EMA cancels. All G thoughts of a context share x_<t and x_t, so S_EMA is one constant per group and
   drops out of eq. 7 exactly: A^(i) = G/(G−1)(S_pred^(i) − mean_j S_pred^(j)) (spec §1.4, NVlabs/RLP
   issue #3). Under eq. 7 as written the EMA teacher therefore has no effect on the gradient. We still
   compute S_EMA because (a) r = S_pred − S_EMA is the logged reward level (rlp/info_gain), the quantity
   whose curve the paper reports, and (b) future --rlp-* options that change the advantage (e.g. batch-
   rather than group-level centring, or advantage clipping) would make it matter. Both are cheap: one
   forward pass of the context per group, not per thought.

6. Thoughts that hit the thought budget without closing </think> (--rlp-unclosed {score,zero}) are the
   caller's decision: 'score' forces </think>, scores x_t after it as usual and passes valid=None here;
   'zero' passes valid = closed to group_advantages. An invalid thought then gets advantage 0 and is left
   out of its group's baseline: the mean is over the G_v valid thoughts with factor G_v/(G_v−1), so the
   valid thoughts keep an exact leave-one-out advantage among themselves. A group with G_v < 2 has no
   baseline and gets all-zero advantages. An invalid thought still counts in the 1/(B·G) denominator
   (it is a thought with tokens whose advantage is zero, exactly like a thought with r = r̄), so the
   number of thoughts in the denominator does not depend on rewards.

7. Numerics: rewards, advantages and the per-token surrogate are computed in at least fp32 (fp64 stays
   fp64), whatever the dtype of the log-probs; the EMA shadow φ must be fp32 (τ = 0.999 increments are
   below bf16 resolution).

The RPT baseline (--objective rpt; Reinforcement Pre-Training, arXiv 2506.08007), on the same rollout,
advantages and surrogate: after </think> the policy predicts the next n = --rlp-rpt-match-tokens tokens
ŷ_1..n (sampled at the thought temperature), and

    r_RPT(c) = 1 if ŷ_k = x_{t+k−1} for every k = 1..n, else 0                     -> prefix_match_reward

The advantage is eq. 7's (centred in the group, not divided by its standard deviation as RPT's GRPO
does: one advantage for both objectives keeps the comparison about the reward).
RPT matches bytes against the text and accepts a prediction that ends on one of its token boundaries;
over tokens that is an exact match of the first n tokens (a prediction that matches only a prefix of
them, or diverges, gets 0). No EMA teacher is involved. Since the reward is 0 from the first mismatch
on, ŷ_k may be drawn from p_θ(· | …, </think>, x_t … x_{t+k−2}) — the text, not the earlier
predictions — without changing the reward's distribution: P(r = 1) = Π_k p_T(x_{t+k−1} | …, x_<t+k−1)
either way. (For n = 1, E[r_RPT] = p_T(x_t | x_<t, c) = exp(S_pred) at T = 1: RPT rewards the
probability of the next token where RLP rewards its log-probability gain over the teacher.)
"""

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------
# Config


@dataclass
class RLPObjectiveConfig:
    """Hyper-parameters of the objective; each field is the --rlp-* flag of the same name."""

    group_size: int = 16  # G, thoughts per context (paper: 16; ablated 4/8/16/32)
    clip_eps_low: float = 0.2  # ε_low (paper: not given; TRL default)
    clip_eps_high: float = 0.2  # ε_high (paper: not given; TRL default ε_high = ε_low)
    ema_decay: float = 0.999  # τ (paper: 0.999; swept 0.99..0.9995)

    def validate(self) -> "RLPObjectiveConfig":
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2:
            raise ValueError(f"--rlp-group-size must be an integer >= 2 (group-relative advantage needs a "
                             f"baseline from the other thoughts), got {g!r}")
        _check_eps(self.clip_eps_low, self.clip_eps_high)
        tau = self.ema_decay
        if not _is_real(tau) or not 0.0 <= tau <= 1.0:
            raise ValueError(f"--rlp-ema-decay must be in [0, 1] (1 = frozen teacher), got {tau!r}")
        return self


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_eps(eps_low: float, eps_high: float) -> None:
    if not _is_real(eps_low) or not 0.0 <= eps_low < 1.0:
        raise ValueError(f"--rlp-clip-eps-low must be in [0, 1) (the lower clip bound 1-eps must stay "
                         f"positive), got {eps_low!r}")
    if not _is_real(eps_high) or eps_high < 0.0:
        raise ValueError(f"--rlp-clip-eps-high must be a finite number >= 0, got {eps_high!r}")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# ---------------------------------------------------------------------------------------------------
# Reward and advantage


def information_gain(s_pred: Tensor, s_ema: Tensor) -> Tensor:
    """r = S_pred − S_EMA (eq. 5), detached, at least fp32.

    s_pred: [B, G], log p_θ(x_t | x_<t, c^(i)) for each thought of each context.
    s_ema:  [B] or [B, 1], log p̄_φ(x_t | x_<t), one per context, broadcast over the G thoughts.
    """
    if s_pred.dim() != 2:
        raise ValueError(f"s_pred must be [B, G] (contexts x thoughts), got shape {tuple(s_pred.shape)}")
    B = s_pred.shape[0]
    if s_ema.dim() == 1 and s_ema.shape[0] == B:
        s_ema = s_ema[:, None]
    elif not (s_ema.dim() == 2 and s_ema.shape == (B, 1)):
        raise ValueError(f"s_ema must be [B] or [B, 1] with B={B} (one teacher score per context), "
                         f"got shape {tuple(s_ema.shape)}")
    dtype = torch.promote_types(_compute_dtype(s_pred), s_ema.dtype)
    return (s_pred.detach().to(dtype) - s_ema.detach().to(dtype))


@torch.no_grad()
def group_advantages(rewards: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """A^(i) = G/(G−1) · (r_i − r̄) per group (eq. 7); no std division; detached; [B, G].

    Equals the RLOO leave-one-out advantage r_i − mean_{j≠i} r_j, sums to zero over each group, and is
    unchanged by adding any per-group constant to r (so S_EMA cancels; see the module docstring).

    valid: optional bool [B, G] (the --rlp-unclosed=zero policy). Invalid thoughts get A = 0 and are
    left out of the baseline: with G_v valid thoughts in a group, A = G_v/(G_v−1)·(r_i − mean over
    valid r). Groups with G_v < 2 get all-zero advantages. Rewards of invalid thoughts are never read,
    so they may be nan or ±inf.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G] (contexts x thoughts), got shape {tuple(rewards.shape)}")
    G = rewards.shape[1]
    if G < 2:
        raise ValueError(f"group size G={G} < 2: the group-relative advantage needs at least 2 thoughts "
                         f"per context (--rlp-group-size >= 2)")
    r = rewards.detach().to(_compute_dtype(rewards))
    if valid is None:
        return G / (G - 1) * (r - r.mean(dim=1, keepdim=True))

    if valid.dtype != torch.bool or valid.shape != rewards.shape:
        raise ValueError(f"valid must be a bool tensor shaped like rewards {tuple(rewards.shape)}, "
                         f"got {valid.dtype} {tuple(valid.shape)}")
    r = torch.where(valid, r, torch.zeros_like(r))
    g_v = valid.sum(dim=1, keepdim=True).to(r.dtype)
    mean = r.sum(dim=1, keepdim=True) / g_v.clamp(min=1)
    scale = torch.where(g_v >= 2, g_v / (g_v - 1).clamp(min=1), torch.zeros_like(g_v))
    return torch.where(valid, scale * (r - mean), torch.zeros_like(r))


@torch.no_grad()
def prefix_match_reward(predictions: Tensor, targets: Tensor) -> Tensor:
    """r_RPT: 1.0 where every predicted token equals the text's, else 0.0; [..., n] → [...], fp32.

    targets < 0 marks tokens the text does not have (past the end of the window): they match any
    prediction, so a prediction is judged on the tokens that exist.
    """
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets "
                         f"{tuple(targets.shape)} must have one shape [..., n]")
    ok = (predictions == targets) | (targets < 0)
    return ok.all(dim=-1).to(torch.float32)


# ---------------------------------------------------------------------------------------------------
# Clipped surrogate


def _flatten_thoughts(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor):
    if logp.dim() not in (2, 3):
        raise ValueError(f"logp must be [N, U] or [B, G, U] (thoughts x thought tokens), "
                         f"got shape {tuple(logp.shape)}")
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp shape {tuple(old_logp.shape)} must equal logp shape {tuple(logp.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal logp shape {tuple(logp.shape)}")
    lead = tuple(logp.shape[:-1])
    N = math.prod(lead)
    # advantages: the leading shape of logp, or flat [N]; a [B, G] tensor also goes with flat [N, U] logp
    # (thought n = b·G + g, row-major, as .reshape(-1) produces).
    ok = tuple(advantages.shape) == lead or (advantages.dim() in (1, 2) and advantages.numel() == N
                                             and (advantages.dim() == 1 or logp.dim() == 2))
    if not ok:
        raise ValueError(f"advantages must be one per thought, shaped {lead} or [{N}], "
                         f"got shape {tuple(advantages.shape)}")
    U = logp.shape[-1]
    return (logp.reshape(N, U), old_logp.reshape(N, U), advantages.reshape(N), mask.reshape(N, U))


def per_thought_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """Per-thought clipped-surrogate losses L^(i) (eq. 8), the building block of the loss.

    logp:       [N, U] or [B, G, U], log π_θ(ℓ_u | ...) of the sampled thought tokens (with grad).
    old_logp:   same shape, log π_θold at sampling time (detached here).
    advantages: [N] or [B, G] (detached here).
    mask:       same shape as logp; nonzero/True marks thought tokens that get loss. Values of logp and
                old_logp at masked-out positions are never used (they may be nan or ±inf) and get exactly
                zero gradient.

    Returns (per_thought_loss [N], has_tokens [N] bool, token_sums). per_thought_loss is
    −(1/|c|) Σ_u min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) for thoughts with tokens and an exact 0 (with grad
    path) for zero-length ones. token_sums holds additive, detached counts so a caller can sum them over
    micro-batches and ranks before dividing (see surrogate_stats):
      num_tokens          masked tokens
      num_clipped_high    masked tokens with A > 0 and ρ > 1+ε_high (clipped term binding, zero gradient)
      num_clipped_low     masked tokens with A < 0 and ρ < 1−ε_low  (clipped term binding, zero gradient)
      ratio_sum           Σ ρ over masked tokens
    A token counts as clipped only where the min strictly picks the clipped term, i.e. where the clip
    removes its gradient. ρ outside the range in the other direction (A > 0, ρ < 1−ε_low or A < 0,
    ρ > 1+ε_high) is not clipped: the min keeps the unclipped, more pessimistic term. A = 0 never clips.
    """
    _check_eps(eps_low, eps_high)
    logp, old_logp, adv, mask = _flatten_thoughts(logp, old_logp, advantages, mask)
    dtype = _compute_dtype(logp)
    mask = mask.bool()
    adv = adv.detach().to(dtype)[:, None]

    # Masked-out positions get log-ratio 0 through where(), so padding never produces inf/nan and its
    # gradient is exactly zero.
    log_ratio = torch.where(mask, logp.to(dtype) - old_logp.detach().to(dtype), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    per_token = torch.where(mask, per_token, 0.0)

    n_tok = mask.sum(dim=-1)
    has_tokens = n_tok > 0
    per_thought_loss = per_token.sum(dim=-1) / n_tok.clamp(min=1).to(dtype)

    with torch.no_grad():
        ratio_d = ratio.detach()
        clip_high = mask & (adv > 0) & (ratio_d > 1.0 + eps_high)
        clip_low = mask & (adv < 0) & (ratio_d < 1.0 - eps_low)
        token_sums = {
            "num_tokens": n_tok.sum().to(dtype),
            "num_clipped_high": clip_high.sum().to(dtype),
            "num_clipped_low": clip_low.sum().to(dtype),
            "ratio_sum": torch.where(mask, ratio_d, 0.0).sum(),
        }
    return per_thought_loss, has_tokens, token_sums


def surrogate_stats(token_sums: Dict[str, Tensor], num_thoughts: Tensor) -> Dict[str, Tensor]:
    """Turn (possibly all-reduced) token_sums into logged stats, all detached.

    clip_frac = (num_clipped_high + num_clipped_low) / num_tokens: the fraction of thought tokens where
    the clipped term is the binding one (see per_thought_surrogate). ratio_mean = mean ρ over thought
    tokens. With no tokens, clip_frac = 0 and ratio_mean = 1 (the on-policy value) instead of 0/0.
    """
    n = token_sums["num_tokens"].detach()
    denom = n.clamp(min=1)
    has = n > 0
    high = token_sums["num_clipped_high"].detach()
    low = token_sums["num_clipped_low"].detach()
    return {
        "clip_frac": torch.where(has, (high + low) / denom, 0.0),
        "clip_frac_high": torch.where(has, high / denom, 0.0),
        "clip_frac_low": torch.where(has, low / denom, 0.0),
        "ratio_mean": torch.where(has, token_sums["ratio_sum"].detach() / denom, 1.0),
        "num_thoughts": num_thoughts.detach().to(n.dtype),
        "num_tokens": n,
    }


def clipped_surrogate_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """L(θ) = mean over thoughts with ≥ 1 token of L^(i) (eq. 8 + Alg. 1 line 14); returns (loss, stats).

    Arguments as in per_thought_surrogate. stats (detached): clip_frac, clip_frac_high, clip_frac_low,
    ratio_mean, num_thoughts (thoughts with ≥ 1 token, the denominator), num_tokens. If no thought has a
    token the loss is 0 with a grad path into logp (zero gradient).
    """
    per_thought, has_tokens, token_sums = per_thought_surrogate(logp, old_logp, advantages, mask,
                                                                eps_low, eps_high)
    num_thoughts = has_tokens.sum()
    # zero-length thoughts contribute an exact 0 to the sum and are not counted in the denominator
    loss = per_thought.sum() / num_thoughts.clamp(min=1).to(per_thought.dtype)
    return loss, surrogate_stats(token_sums, num_thoughts)


# ---------------------------------------------------------------------------------------------------
# EMA teacher


@torch.no_grad()
def ema_update_(ema_params: Iterable[Tensor], params: Iterable[Tensor], decay: float) -> None:
    """φ ← τ φ + (1−τ) θ in place, for each pair; call after every optimizer step.

    ema_params must be fp32 (a bf16 shadow would round away the (1−τ) θ increments); params may be any
    floating dtype. The first φ is a copy of θ (lazy init, Alg. 1 lines 8-9) and is the caller's job.
    """
    if not _is_real(decay) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"--rlp-ema-decay must be in [0, 1], got {decay!r}")
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        raise ValueError(f"ema_params has {len(ema_params)} tensors but params has {len(params)}")
    for i, (phi, theta) in enumerate(zip(ema_params, params)):
        if phi.dtype != torch.float32:
            raise ValueError(f"EMA parameter {i} must be fp32, got {phi.dtype}")
        if phi.shape != theta.shape:
            raise ValueError(f"EMA parameter {i} shape {tuple(phi.shape)} != parameter shape "
                             f"{tuple(theta.shape)}")
        phi.mul_(decay).add_(theta.detach().to(torch.float32), alpha=1.0 - decay)


def ema_closed_form(initial: Tensor, history: Sequence[Tensor], decay: float) -> Tensor:
    """φ_k = τ^k θ_0 + Σ_{j=1..k} (1−τ) τ^{k−j} θ_j, the value of ema_update_ after k steps.

    initial is θ_0 (φ_0 = θ_0) and history is [θ_1, ..., θ_k], the parameters after each optimizer step.
    Computed in fp64 (reference for tests), returned in fp32.
    """
    k = len(history)
    out = initial.detach().to(torch.float64) * decay ** k
    for j, theta in enumerate(history, start=1):
        out = out + (1.0 - decay) * decay ** (k - j) * theta.detach().to(torch.float64)
    return out.to(torch.float32)


__all__ = [
    "RLPObjectiveConfig",
    "information_gain",
    "group_advantages",
    "prefix_match_reward",
    "per_thought_surrogate",
    "surrogate_stats",
    "clipped_surrogate_loss",
    "ema_update_",
    "ema_closed_form",
]
