"""The PPO math against numbers worked out by hand (pure torch, fast)."""

from __future__ import annotations

import math
import types

import pytest
import torch

from cluster.shared import logprobs
from learner import ppo

LN2 = math.log(2.0)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_and_unbiased_variance_ignore_masked_values():
    x = t([2.0, 4.0, 100.0], [6.0, -50.0, 7.0])
    mask = t([1, 1, 0], [1, 0, 0])
    assert ppo.masked_mean(x, mask).item() == pytest.approx(4.0)
    # (2-4)^2 + 0 + (6-4)^2 = 8, over n - 1 = 2.
    assert ppo.masked_var(x, mask).item() == pytest.approx(4.0)
    assert ppo.masked_var(x, mask, unbiased=False).item() == pytest.approx(8.0 / 3.0)
    assert ppo.masked_mean(x, mask, dim=1).tolist() == pytest.approx([3.0, 6.0])


def test_whitening_with_mask():
    x = t([2.0, 4.0, 100.0], [6.0, -50.0, 7.0])
    mask = t([1, 1, 0], [1, 0, 0])
    # mean 4, std 2: the masked values become -1, 0, 1 and the rest 0.
    white = ppo.masked_whiten(x, mask)
    assert white.tolist() == [pytest.approx([-1.0, 0.0, 0.0]), pytest.approx([1.0, 0.0, 0.0])]
    scaled = ppo.masked_whiten(x, mask, shift_mean=False)
    assert scaled.tolist() == [pytest.approx([3.0, 4.0, 0.0]), pytest.approx([5.0, 0.0, 0.0])]


# --------------------------------------------------------------------------- log-probs


def test_logprobs_and_entropy_at_a_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probs 1/4, 3/4 at T=1
    tokens = torch.tensor([[1]])
    assert logprobs.logprobs_from_logits(logits, tokens).item() == pytest.approx(math.log(0.75))
    # At T=2 the logits halve: p(1) = sqrt(3) / (1 + sqrt(3)).
    s3 = math.sqrt(3.0)
    assert logprobs.logprobs_from_logits(logits, tokens, 2.0).item() == pytest.approx(math.log(s3 / (1 + s3)))
    uniform = torch.zeros(1, 1, 4)
    assert logprobs.entropy_from_logits(uniform).item() == pytest.approx(math.log(4.0))
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert logprobs.entropy_from_logits(logits).item() == pytest.approx(h, rel=1e-6)
    # The learner trains with both from one log-softmax: the same numbers.
    logp, entropy = logprobs.logprobs_and_entropy(logits, tokens, 2.0)
    assert logp.item() == pytest.approx(math.log(s3 / (1 + s3)))
    assert entropy.item() == pytest.approx(logprobs.entropy_from_logits(logits, 2.0).item(), rel=1e-6)


class TableLM(torch.nn.Module):
    """A causal LM whose next-token distribution at position t is row t of a table, whatever
    the tokens: what `response_logprobs` reads of a model is where each position's logits go."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.log_table = probs.log()  # (L, V)

    def forward(self, input_ids, attention_mask, use_cache, logits_to_keep):
        logits = self.log_table[: input_ids.shape[1]].expand(input_ids.shape[0], -1, -1)
        return types.SimpleNamespace(logits=logits[:, -logits_to_keep:])


def test_response_logprobs_read_each_response_token_at_the_position_before_it():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    lm, pad_id = TableLM(probs), 3
    # Rows [2, 3 | 0, 1] and [2 | 1, 0, 1]: position t predicts token t + 1.
    ids, attention, mask, starts = logprobs.response_positions([[2, 3], [2]], [[0, 1], [1, 0, 1]], pad_id)
    assert ids.tolist() == [[2, 3, 0, 1], [2, 1, 0, 1]] and attention.tolist() == [[1] * 4] * 2
    assert starts == [1, 0] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    logp, _ = logprobs.response_logprobs(lm, ids, attention, mask, 0)
    want = [[0.0, math.log(0.4), math.log(0.1)], [math.log(0.2), math.log(0.4), math.log(0.1)]]
    assert logp.tolist()[0] == pytest.approx(want[0]) and logp.tolist()[1] == pytest.approx(want[1])
    # From the first response position on (`offset`), the same numbers without the prompt's.
    ids, attention, mask, starts = logprobs.response_positions([[2, 3]], [[0, 1]], pad_id)
    logp, _ = logprobs.response_logprobs(lm, ids, attention, mask[:, 1:], 1)
    assert logp.tolist()[0] == pytest.approx(want[0][1:])
    # A shorter row is padded, and its padding is no response position.
    ids, attention, mask, _ = logprobs.response_positions([[2, 3]], [[0]], pad_id)
    ids2, attention2, mask2, _ = logprobs.response_positions([[2, 3], [2, 3]], [[0], [0, 1]], pad_id)
    assert ids2[0].tolist() == [2, 3, 0, pad_id] and attention2[0].tolist() == [1, 1, 1, 0]
    assert mask2[0].tolist() == [0, 1, 0] and mask2[0, :2].tolist() == mask[0].tolist()


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    # pi = 1/2, pi_ref = 1/4: log(pi / pi_ref) = ln 2, r = pi_ref / pi = 1/2.
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert ppo.kl_k1(logp, ref).item() == pytest.approx(LN2)
    assert ppo.kl_k2(logp, ref).item() == pytest.approx(0.5 * LN2**2)
    assert ppo.kl_k3(logp, ref).item() == pytest.approx(0.5 - 1.0 + LN2)
    # Reversed: k1 goes negative, k3 stays positive: r = 2 -> (2 - 1) - ln 2.
    assert ppo.kl_k1(ref, logp).item() == pytest.approx(-LN2)
    assert ppo.kl_k3(ref, logp).item() == pytest.approx(1.0 - LN2)
    assert set(ppo.KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_kl_estimators_average_to_the_true_kl():
    # Sampling from pi, k1 and k3 are unbiased estimates of KL(pi || ref).
    pi = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    ref = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    true_kl = float((pi * (pi / ref).log()).sum())
    lp, lr = pi.log(), ref.log()
    for name in ("k1", "k3"):
        expected = float((pi * ppo.KL_ESTIMATORS[name](lp, lr)).sum())
        assert expected == pytest.approx(true_kl, rel=1e-12), name


# --------------------------------------------------------------------------- rewards


def test_kl_shaped_reward_puts_the_score_on_the_last_response_token():
    logp = t([0.0, math.log(0.5), math.log(0.5), math.log(0.25), 0.0])
    ref = t([0.0, math.log(0.25), math.log(0.5), math.log(0.5), 0.0])
    mask = t([0, 1, 1, 1, 0])  # a prompt position, three response tokens, one pad
    rewards, kl = ppo.kl_shaped_rewards(t(2.0), logp, ref, mask, kl_coef=0.1, estimator="k1")
    assert kl.tolist()[0] == pytest.approx([0.0, LN2, 0.0, -LN2, 0.0])
    assert rewards.tolist()[0] == pytest.approx([0.0, -0.1 * LN2, 0.0, 0.1 * LN2 + 2.0, 0.0])
    _, kl2 = ppo.kl_shaped_rewards(t(2.0), logp, ref, mask, kl_coef=0.1, estimator="k2")
    assert kl2.tolist()[0] == pytest.approx([0.0, 0.5 * LN2**2, 0.0, 0.5 * LN2**2, 0.0])


def test_missing_eos_penalty_and_truncation_at_the_stop_token():
    scores = ppo.apply_missing_eos_penalty(t(1.0, 1.0), torch.tensor([True, False]), 0.5)
    assert scores.tolist() == [1.0, 0.5]
    tokens = torch.tensor([[9, 5, 1, 7, 1], [9, 5, 6, 7, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    assert ppo.mask_after_stop(tokens, mask, stop_token_id=1).tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]]


# --------------------------------------------------------------------------- GAE


def test_gae_by_hand():
    rewards, values = t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7])
    adv, ret = ppo.gae(rewards, values, t([1, 1, 1]), gamma=1.0, gae_lambda=0.5)
    # t=2: 1 - 0.7 = 0.3; t=1: (0.7 - 0.6) + 0.5 * 0.3 = 0.25; t=0: 0.1 + 0.5 * 0.25 = 0.225
    assert adv.tolist()[0] == pytest.approx([0.225, 0.25, 0.3])
    assert ret.tolist()[0] == pytest.approx([0.725, 0.85, 1.0])


def test_gae_discounts_and_ignores_prompt_and_padding():
    # gamma 0.9, lambda 1: A_0 is the discounted return minus V_0 = 0.9 * 1 - 0.2.
    rewards = t([7.0, 0.0, 1.0, 5.0], [0.0, 2.0, 0.0, 0.0])
    values = t([3.0, 0.2, 0.4, 9.0], [0.0, 1.5, 0.0, 0.0])
    mask = t([0, 1, 1, 0], [0, 1, 0, 0])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, gae_lambda=1.0)
    assert adv.tolist() == [pytest.approx([0.0, 0.7, 0.6, 0.0]), pytest.approx([0.0, 0.5, 0.0, 0.0])]
    assert ret.tolist() == [pytest.approx([0.0, 0.9, 1.0, 0.0]), pytest.approx([0.0, 2.0, 0.0, 0.0])]


# --------------------------------------------------------------------------- losses


def test_clipped_policy_loss_on_both_sides_of_the_clip():
    # (advantage, ratio): + with r above 1+eps (clipped), + with r below (not clipped),
    # - with r below 1-eps (clipped), - with r above (not clipped).
    adv = t([1.0, 1.0, -1.0, -1.0])
    ratio = t([1.5, 0.5, 0.5, 1.5])
    old = t([-1.0, -2.0, -0.5, -3.0])
    logp = (old + ratio.log()).requires_grad_()
    out = ppo.clipped_policy_loss(logp, old, adv, torch.ones_like(adv), clip_ratio=0.2)
    # per token: max(-1.5, -1.2) = -1.2, max(-0.5, -0.8) = -0.5, max(0.5, 0.8) = 0.8,
    # max(1.5, 1.2) = 1.5 -> mean 0.15
    assert out.loss.item() == pytest.approx(0.15)
    assert out.clipfrac.item() == pytest.approx(0.5)
    assert out.ratio.item() == pytest.approx(1.0)
    assert out.approxkl.item() == pytest.approx(0.5 * (2 * math.log(1.5) ** 2 + 2 * LN2**2) / 4)
    out.loss.backward()
    # Clipped tokens get no gradient; the others d(-A r)/dlogp / 4 = -A r / 4.
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -0.125, 0.0, 0.375])


def test_policy_loss_weights_mask_and_normaliser():
    adv, old = t([1.0, 2.0, 3.0]), t([0.0, 0.0, 0.0])
    logp = t([0.0, 0.0, 0.0])
    weights, mask = t([0.5, 2.0, 1.0]), t([1, 1, 0])
    out = ppo.clipped_policy_loss(logp, old, adv, mask, 0.2, weights=weights)
    assert out.loss.item() == pytest.approx((-1.0 * 0.5 - 2.0 * 2.0) / 2)
    out10 = ppo.clipped_policy_loss(logp, old, adv, mask, 0.2, weights=weights, normaliser=10)
    assert out10.loss.item() == pytest.approx(-4.5 / 10)


def test_clipped_value_loss_on_both_sides_of_the_clip():
    values = t([0.5, 0.1, 0.5, -0.5]).requires_grad_()
    old, returns = t([0.0, 0.0, 0.0, 0.0]), t([1.0, 1.0, 0.0, 1.0])
    out = ppo.clipped_value_loss(values, old, returns, torch.ones(1, 4), value_clip=0.2)
    # 0.5 * max((0.5-1)^2, (0.2-1)^2) = 0.32 (clipped branch), 0.5 * 0.81 = 0.405,
    # 0.5 * max(0.25, 0.04) = 0.125, 0.5 * max(2.25, 1.44) = 1.125
    assert out.loss.item() == pytest.approx((0.32 + 0.405 + 0.125 + 1.125) / 4)
    assert out.clipfrac.item() == pytest.approx(0.25)
    out.loss.backward()
    # d/dv of 0.5 (v - R)^2 / 4 where the unclipped branch wins; 0 where the clip does.
    assert values.grad.tolist()[0] == pytest.approx([0.0, -0.9 / 4, 0.5 / 4, -1.5 / 4])


def test_entropy_bonus_and_nll():
    mask = t([1, 1, 0])
    assert ppo.entropy_bonus(t([1.0, 2.0, 9.0]), mask).item() == pytest.approx(1.5)
    assert ppo.nll_loss(t([-1.0, -3.0, -9.0]), mask).item() == pytest.approx(2.0)


# --------------------------------------------------------------------------- importance weight


def test_truncated_importance_weight():
    prox = t([math.log(0.3), math.log(0.1), math.log(0.2)])
    behaviour = t([math.log(0.1), math.log(0.2), math.log(0.2)])
    w = ppo.truncated_importance_weight(prox, behaviour, cap=2.0)
    assert w.tolist()[0] == pytest.approx([2.0, 0.5, 1.0])  # 3 is capped at C = 2
    assert not w.requires_grad


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_by_hand():
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, n_samples=1000)  # error 0.5 clipped to 0.2: x (1 + 0.2 * 0.1)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(3.0, n_samples=1000)  # error -0.5 clipped to -0.2: x 0.98
    assert ctl.value == pytest.approx(0.102 * 0.98)
    ctl.update(6.6, n_samples=500)  # error 0.1: x (1 + 0.1 * 0.05)
    assert ctl.value == pytest.approx(0.102 * 0.98 * 1.005)
    ctl.update(float("nan"), n_samples=500)
    assert ctl.value == pytest.approx(0.102 * 0.98 * 1.005)
    restored = ppo.AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller_stays():
    ctl = ppo.FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05


def test_any_nonfinite():
    assert not ppo.any_nonfinite(t(1.0), t(2.0))
    assert ppo.any_nonfinite(t(1.0), t(float("nan")))
    assert ppo.any_nonfinite(t(float("-inf")))


def test_learning_rate_warm_up_starts_above_zero_then_decays_to_zero():
    """tame's schedule (learner.training.lr_factor): warm-up reaches the full rate at step
    warmup - 1, never spending a step at lr 0 (Hugging Face's get_scheduler starts at 0),
    then decays to 0 at the run's last step."""
    from learner.training import lr_factor

    linear = [lr_factor(step, "linear", 2, 6) for step in range(8)]
    assert linear == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert [lr_factor(step, "constant", 4, 10) for step in (0, 3, 9)] == pytest.approx([0.25, 1.0, 1.0])
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5)  # half-way through the decay
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_factor(5, "exponential", 0, 10)


# --------------------------------------------------------------------------- critic-free estimators


def test_grpo_normalises_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    # Group 0: mean 2, unbiased std 1 -> -1, 0, 1. Group 1: all equal -> 0, no NaN.
    adv = ppo.grpo_advantages(rewards, groups, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    # Dr. GRPO: centred only. Groups need not be contiguous.
    adv = ppo.grpo_advantages(torch.tensor([4.0, 1.0, 0.0, 3.0]), torch.tensor([1, 0, 1, 0]), scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([2.0, -1.0, -2.0, 1.0]))


def test_rloo_subtracts_the_mean_of_the_other_samples():
    adv = ppo.rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 7.0, 7.0]), torch.tensor([0, 0, 0, 1, 1]))
    # 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2; equal rewards give 0.
    torch.testing.assert_close(adv, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        ppo.rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_reinforce_pp_sums_rewards_into_returns_and_whitens_over_the_batch():
    rewards = torch.tensor([[0.0, -0.1, 1.0, 0.0], [0.0, -0.2, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    returns = ppo.discounted_returns(rewards, mask, gamma=1.0)
    torch.testing.assert_close(returns, torch.tensor([[0.0, 0.9, 1.0, 0.0], [0.0, -0.2, 0.0, 0.0]]))
    half = ppo.discounted_returns(rewards, mask, gamma=0.5)
    assert half[0, 1].item() == pytest.approx(-0.1 + 0.5 * 1.0)
    adv = ppo.reinforce_pp_advantages(rewards, mask)
    values = torch.tensor([0.9, 1.0, -0.2, 0.0, 0.0])  # the 5 response tokens
    expected = (values - values.mean()) / (values.var(unbiased=True) + 1e-8).sqrt()
    torch.testing.assert_close(adv[mask.bool()], expected)
    assert float(adv[~mask.bool()].abs().sum()) == 0.0


def test_the_estimator_table_covers_every_setting_and_gives_each_estimator_by_hand():
    """`ppo.ADVANTAGE_ESTIMATORS`, one signature: (rewards, values, mask, groups, settings) ->
    (advantages, returns). Two prompts of two samples; rewards at the last response token."""
    from typing import get_args

    from cluster.shared.config import PPOConfig

    assert set(ppo.ADVANTAGE_ESTIMATORS) == set(get_args(PPOConfig.model_fields["advantage"].annotation))
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
    values = torch.tensor([[0.0, 0.5, 0.5], [0.25, 0.25, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    groups = torch.tensor([0, 0, 1, 1])
    plain = ppo.AdvantageSettings(gamma=1.0, gae_lambda=1.0, whiten=False)

    # GAE at gamma = lambda = 1: A_t = (sum of the rewards from t) - V_t; returns = A + V.
    advantages, returns = ppo.ADVANTAGE_ESTIMATORS["gae"](rewards, values, mask, groups, plain)
    torch.testing.assert_close(
        advantages, torch.tensor([[0.0, 0.5, 0.5], [2.75, 2.75, 0.0], [0.0, 0.0, 1.0], [2.0, 2.0, 2.0]])
    )
    torch.testing.assert_close(
        returns, torch.tensor([[0.0, 1.0, 1.0], [3.0, 3.0, 0.0], [0.0, 0.0, 2.0], [2.0, 2.0, 2.0]])
    )
    whitened, _ = ppo.ADVANTAGE_ESTIMATORS["gae"](rewards, values, mask, groups, plain._replace(whiten=True))
    torch.testing.assert_close(whitened, ppo.masked_whiten(advantages, mask))

    # GRPO: sequence rewards 1, 3 | 2, 2 -> group means 2 | 2; stds sqrt(2) | 0. RLOO: r minus
    # the other sample's. Each on every response token; no returns without a critic.
    grpo, no_returns = ppo.ADVANTAGE_ESTIMATORS["grpo"](rewards, values, mask, groups, plain)
    torch.testing.assert_close(grpo, torch.tensor([-1.0, 1.0, 0.0, 0.0])[:, None] / (math.sqrt(2) + 1e-6) * mask)
    assert float(no_returns.abs().sum()) == 0.0
    dr_grpo, _ = ppo.ADVANTAGE_ESTIMATORS["grpo"](rewards, values, mask, groups, plain._replace(scale_by_std=False))
    torch.testing.assert_close(dr_grpo, torch.tensor([-1.0, 1.0, 0.0, 0.0])[:, None] * mask)
    rloo, _ = ppo.ADVANTAGE_ESTIMATORS["rloo"](rewards, values, mask, groups, plain)
    torch.testing.assert_close(rloo, torch.tensor([-2.0, 2.0, 0.0, 0.0])[:, None] * mask)

    # REINFORCE++: the returns whitened over the batch's tokens; a single token is left as it is.
    reinforce, _ = ppo.ADVANTAGE_ESTIMATORS["reinforce_pp"](rewards, values, mask, groups, plain)
    torch.testing.assert_close(reinforce, ppo.masked_whiten(ppo.discounted_returns(rewards, mask, 1.0), mask))
    one = torch.tensor([[0.0, 1.0, 0.0]])
    alone, _ = ppo.ADVANTAGE_ESTIMATORS["reinforce_pp"](
        torch.tensor([[0.0, 0.7, 0.0]]), torch.zeros(1, 3), one, torch.tensor([0]), plain
    )
    torch.testing.assert_close(alone, torch.tensor([[0.0, 0.7, 0.0]]))


def test_loss_aggregations_weigh_tokens_as_their_papers_say():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # 3 tokens and 1 token
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])

    def total(aggregation):
        return float(
            (per_token * ppo.token_weights(mask, aggregation, n_sequences=2, n_tokens=4.0, max_new_tokens=8)).sum()
        )

    assert total("token_mean") == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert total("sequence_mean") == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)
    # Dr. GRPO: a constant normaliser, max_new_tokens x sequences, whatever the lengths.
    assert total("token_sum_norm") == pytest.approx((1 + 2 + 3 + 4) / (8 * 2))
    # Split into micro-batches by row, the weights still add up to the minibatch's.
    for aggregation in ("token_mean", "sequence_mean", "token_sum_norm"):
        whole = ppo.token_weights(mask, aggregation, 2, 4.0, 8)
        rows = [ppo.token_weights(mask[i : i + 1], aggregation, 2, 4.0, 8) for i in range(2)]
        torch.testing.assert_close(torch.cat(rows), whole)


def test_a_scalar_head_computes_in_float32_whatever_its_weights_are_held_in():
    # FSDP's param_dtype hands the value head its weights in bfloat16 during the forward pass:
    # values must still come out with float32 precision (GAE sums small differences of them).
    from cluster.shared.precision import float32_head

    head = torch.nn.Linear(64, 1).to(torch.bfloat16)
    features = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = float32_head(head, features)
    want = features @ head.weight.float().T + head.bias.float()
    assert values.dtype == torch.float32 and torch.allclose(values, want, rtol=1e-6, atol=1e-6)
