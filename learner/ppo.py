"""The PPO math of RLHF as pure functions of tensors.

No ray, no IO, no config objects: every function takes tensors and a few floats, so it can
be tested with numbers worked out by hand. Shapes: `B` sequences, `T` token positions.
Per-token tensors are aligned with the *actions* (the response tokens), and a `mask` of
shape (B, T) marks the positions that count (1 = a response token, 0 = prompt or padding).

References:
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate).
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (GAE).
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (KL-shaped
  reward, adaptive KL controller); Ouyang et al. 2022 (InstructGPT, PPO-ptx).
- Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (score at the last
  response token, value clipping, whitening, missing-EOS penalty).
- Schulman 2020, "Approximating KL Divergence" (k1, k2, k3).
- Hilton et al. 2022, "Batch size-invariance for policy optimization" (decoupled PPO: the
  ratio against a proximal policy, the behaviour policy as an importance weight).

Loss functions take an optional `normaliser` (default: the number of masked tokens). The
learner passes the token count of the whole minibatch, so summing the losses of its
micro-batches gives exactly the loss of the minibatch processed whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

# --------------------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is 1. x, mask: (B, T) -> scalar, or (B,) with dim=1."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1. x, mask: (B, T) -> scalar or (B,)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked positions (with Bessel's correction by default).
    x, mask: (B, T) -> scalar."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("the unbiased variance needs at least two masked values")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions; masked-out positions come back as 0.

    With `shift_mean=False` the mean is added back (only the scale is normalised), as the N+
    paper does for rewards. x, mask: (B, T) -> (B, T).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# --------------------------------------------------------------------------- KL estimators
# Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020), with
# log r = log pi_ref - log pi. k1 is unbiased but can be negative; k2 is biased, low
# variance; k3 is unbiased and always >= 0.


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref. (B, T), (B, T) -> (B, T)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2. (B, T), (B, T) -> (B, T)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref / pi. (B, T), (B, T) -> (B, T)."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


# --------------------------------------------------------------------------- rewards


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last masked position of each row (0 for an empty row). (B, T) -> (B,)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).argmax(dim=1)


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: `-kl_coef * KL_t` at every response token, plus the reward-model
    score at the last response token (Ziegler et al. 2019; InstructGPT; N+ paper).

    scores: (B,); logprobs, ref_logprobs, mask: (B, T).
    Returns (rewards, kl), both (B, T) and zero where mask is 0.
    """
    kl = KL_ESTIMATORS[estimator](logprobs, ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask, kl


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the score of every response that did not end (N+ paper).
    scores: (B,), has_eos: (B,) bool -> (B,)."""
    return scores - penalty * (~has_eos).to(scores.dtype)


def mask_after_stop(tokens: torch.Tensor, mask: torch.Tensor, stop_token_id: int) -> torch.Tensor:
    """Drop the positions after the first stop token of each row (the stop token stays).
    tokens, mask: (B, T) -> (B, T) mask."""
    is_stop = (tokens == stop_token_id) & mask.bool()
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    return mask * (stops_before == 0).to(mask.dtype)


# --------------------------------------------------------------------------- advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each response.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lambda * A_{t+1},
    with V and A zero after the last response token (the episode ends there).

    rewards, values, mask: (B, T); the mask must be one contiguous run per row (prompt
    positions before it, padding after it). Returns (advantages, returns = A + V), both
    (B, T) and zero where mask is 0.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * gae_lambda * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# --------------------------------------------------------------------------- critic-free advantages
# Sequence-level estimators over groups: the samples of one prompt. `groups` (B,) holds
# each row's group index; every response token gets its sequence's advantage.


def _group_sums(values: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of `values` over its group, and the group's size. (B,), (B,) -> (B,), (B,)."""
    n_groups = int(groups.max()) + 1
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, groups, values)
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, groups, torch.ones_like(values)
    )
    return sums[groups], counts[groups]


def grpo_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): (r - mean of its group) / (std of its group +
    eps), the std unbiased over the group's samples. `scale_by_std=False` is Dr. GRPO (Liu
    et al. 2025): the mean is subtracted, nothing is divided, so easy and hard prompts weigh
    alike. A group whose rewards are all equal gets 0. rewards, groups: (B,) -> (B,)."""
    sums, counts = _group_sums(rewards, groups)
    centred = rewards - sums / counts
    if not scale_by_std:
        return centred
    squares, _ = _group_sums(centred**2, groups)
    std = torch.sqrt(squares / (counts - 1).clamp(min=1))
    return centred / (std + eps)


def rloo_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): r minus the mean reward of the *other* samples of its
    prompt, an unbiased baseline. Groups need at least 2 samples. (B,), (B,) -> (B,)."""
    sums, counts = _group_sums(rewards, groups)
    if bool((counts < 2).any()):
        raise ValueError("RLOO needs at least 2 samples of every prompt")
    return rewards - (sums - rewards) / (counts - 1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over each response, zero after it. (B, T) -> (B, T)."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): the per-token (KL-shaped) rewards summed into returns, then
    whitened over every response token of the global batch; no critic. (B, T) -> (B, T)."""
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask)


# --------------------------------------------------------------------------- the estimators, one signature
# `ppo.advantage` picks one by name. Each takes the per-token rewards (B, T), the critic's
# values (B, T; zeros without a critic), the response mask (B, T), each row's group (B,) and
# the settings below, and returns (advantages, returns), both (B, T); the returns (the critic's
# targets) are zeros for the critic-free estimators.


class AdvantageSettings(NamedTuple):
    gamma: float = 1.0
    """Discount of GAE and of REINFORCE++'s returns."""
    gae_lambda: float = 0.95
    whiten: bool = True
    """Whiten GAE's advantages over the batch's response tokens."""
    scale_by_std: bool = True
    """GRPO divides by the group's std; False is Dr. GRPO."""


def estimate_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor, s: AdvantageSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gae`, whitened over the batch (when asked, and there are two tokens to whiten)."""
    advantages, returns = gae(rewards, values, mask, s.gamma, s.gae_lambda)
    if s.whiten and mask.sum() > 1:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def estimate_reinforce_pp(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor, s: AdvantageSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reinforce_pp_advantages`; a batch of one token has nothing to whiten: its return."""
    advantages = (
        reinforce_pp_advantages(rewards, mask, s.gamma)
        if mask.sum() > 1
        else discounted_returns(rewards, mask, s.gamma)
    )
    return advantages, torch.zeros_like(rewards)


def estimate_grpo(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor, s: AdvantageSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """`grpo_advantages` of each sequence's summed reward (the score, minus the shaped KL when
    it is in the reward), on every one of its tokens."""
    per_sequence = grpo_advantages(rewards.sum(1), groups, s.scale_by_std)
    return per_sequence[:, None] * mask, torch.zeros_like(rewards)


def estimate_rloo(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor, s: AdvantageSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rloo_advantages` of each sequence's summed reward, on every one of its tokens."""
    return rloo_advantages(rewards.sum(1), groups)[:, None] * mask, torch.zeros_like(rewards)


AdvantageEstimator = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AdvantageSettings], tuple[torch.Tensor, torch.Tensor]
]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": estimate_gae,
    "grpo": estimate_grpo,
    "rloo": estimate_rloo,
    "reinforce_pp": estimate_reinforce_pp,
}


# --------------------------------------------------------------------------- loss aggregation


def token_weights(
    mask: torch.Tensor, aggregation: str, n_sequences: int, n_tokens: float, max_new_tokens: int
) -> torch.Tensor:
    """Per-token weights that turn a token sum into the chosen aggregation of a minibatch of
    `n_sequences` sequences and `n_tokens` response tokens (counted over the whole minibatch,
    so micro-batches add up to exactly the minibatch's loss):

    - token_mean: 1 / n_tokens (every token alike; long responses weigh more);
    - sequence_mean: 1 / (its sequence's tokens x n_sequences) (every sequence alike);
    - token_sum_norm: 1 / (max_new_tokens x n_sequences), a constant (Dr. GRPO: no length bias).

    mask: (B, T) -> (B, T), zero where mask is 0.
    """
    if aggregation == "token_mean":
        return mask / n_tokens
    if aggregation == "sequence_mean":
        return mask / (mask.sum(1, keepdim=True).clamp(min=1) * n_sequences)
    if aggregation == "token_sum_norm":
        return mask / (max_new_tokens * n_sequences)
    raise ValueError(f"unknown loss aggregation {aggregation!r}")


# --------------------------------------------------------------------------- importance weights


def truncated_importance_weight(
    proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """min(pi_prox / pi_behaviour, C) per token, without gradient.

    Corrects for rollouts made by older weights (staleness) or by a numerically different
    engine; the cap bounds the variance (truncated IS, as in IMPALA's rho-bar).
    (B, T), (B, T) -> (B, T).
    """
    return torch.exp(proximal_logprobs - behaviour_logprobs).clamp(max=cap).detach()


# --------------------------------------------------------------------------- losses


class PolicyLoss(NamedTuple):
    loss: torch.Tensor
    """Clipped surrogate loss (to minimise), summed over tokens / normaliser."""
    clipfrac: torch.Tensor
    """Share of tokens where the clipped branch was taken."""
    approxkl: torch.Tensor
    """0.5 * (log pi - log pi_old)^2, averaged: a KL estimate between new and old policy."""
    ratio: torch.Tensor
    """Mean of pi / pi_old."""


def _normalise(total: torch.Tensor, mask: torch.Tensor, normaliser: float | None) -> torch.Tensor:
    return total / (mask.sum().clamp(min=1) if normaliser is None else normaliser)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float,
    weights: torch.Tensor | None = None,
    normaliser: float | None = None,
    aggregation: torch.Tensor | None = None,
) -> PolicyLoss:
    """PPO's clipped surrogate, token-level: max(-A r, -A clip(r, 1-eps, 1+eps)) with
    r = pi / pi_old, optionally times a per-token importance weight (decoupled PPO).

    logprobs (with gradient), old_logprobs, advantages, mask, weights: (B, T).
    All fields of the result are token sums divided by `normaliser` (default: mask.sum()),
    except the loss when `aggregation` (B, T) gives per-token weights (`token_weights`):
    then the loss is the token sum times them.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    with torch.no_grad():
        clipfrac = _normalise(masked_sum((clipped > unclipped).float(), mask), mask, normaliser)
        approxkl = _normalise(masked_sum(0.5 * log_ratio**2, mask), mask, normaliser)
        mean_ratio = _normalise(masked_sum(ratio, mask), mask, normaliser)
    loss = (
        _normalise(masked_sum(per_token, mask), mask, normaliser)
        if aggregation is None
        else (per_token * aggregation).sum()
    )
    return PolicyLoss(loss, clipfrac, approxkl, mean_ratio)


class ValueLoss(NamedTuple):
    loss: torch.Tensor
    """0.5 * max((V - R)^2, (V_clipped - R)^2), summed over tokens / normaliser."""
    clipfrac: torch.Tensor
    """Share of tokens where the clipped branch was larger."""


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float,
    normaliser: float | None = None,
) -> ValueLoss:
    """The value loss with the prediction clipped to old_values +- value_clip (N+ paper).

    values (with gradient), old_values, returns, mask: (B, T).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_loss, clipped_loss)
    with torch.no_grad():
        clipfrac = _normalise(masked_sum((clipped_loss > unclipped_loss).float(), mask), mask, normaliser)
    return ValueLoss(_normalise(masked_sum(per_token, mask), mask, normaliser), clipfrac)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, normaliser: float | None = None) -> torch.Tensor:
    """Mean per-token entropy (to be *subtracted* from the loss times entropy_coef).
    entropy, mask: (B, T) -> scalar."""
    return _normalise(masked_sum(entropy, mask), mask, normaliser)


def nll_loss(logprobs: torch.Tensor, mask: torch.Tensor, normaliser: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the masked tokens: the SFT loss and PPO-ptx's pretraining
    term (InstructGPT). logprobs, mask: (B, T) -> scalar."""
    return -_normalise(masked_sum(logprobs, mask), mask, normaliser)


# --------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + e * n / horizon), with the proportional
    error e = clip(KL / target - 1, -0.2, 0.2), after each batch of n samples."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def any_nonfinite(*tensors: torch.Tensor) -> bool:
    """True when any of the tensors holds a NaN or an Inf."""
    return any(not bool(torch.isfinite(t).all()) for t in tensors)
