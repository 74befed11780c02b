"""The experience of one update, built in steps, each a record with every field set:

1. `tokenize`: scored rollouts -> `Batch` (token ids, masks, behaviour log-probs, scores,
   and the reference log-probs when the actors computed them);
2. the learner's no-grad passes -> reference (unless given) and proximal log-probs, old values;
3. `make_experience`: the batch with those and the shaped rewards, advantages, returns and
   importance weights (`Experience`: what the PPO epochs train on), and the batch's metrics
   (`experience_metrics`). A pure function of tensors and the `ppo` settings.

Token tensors are (B, L), per-token tensors (B, W) over the prediction positions
`offset .. offset + W - 1` (position t predicts input_ids[:, t + 1]). `select` cuts rows to
the columns they need: up to their longest sequence, and per-token tensors from their
earliest response token, so prompt positions no row needs never reach the LM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cluster.shared.logprobs import response_positions
from cluster.shared.records import Rollout
from learner import ppo

if TYPE_CHECKING:
    from cluster.shared.config import PPOConfig


@dataclass(frozen=True)
class Window:
    """Rows of a full batch and the columns they need."""

    rows: torch.Tensor
    start: int
    """The first prediction position any of the rows needs."""
    width: int
    """The longest sequence of the rows, in tokens."""

    def tokens(self, t: torch.Tensor) -> torch.Tensor:  # (B, L) -> (b, width)
        return t[self.rows, : self.width]

    def per_token(self, t: torch.Tensor) -> torch.Tensor:  # (B, L-1) -> (b, width - 1 - start)
        return t[self.rows, self.start : self.width - 1]

    def columns(self) -> slice:
        """Where a window's per-token values go back into a full (B, L-1) tensor."""
        return slice(self.start, self.width - 1)


@dataclass(frozen=True)
class Batch:
    """Step 1: scored rollouts as tensors on the learner's device."""

    input_ids: torch.Tensor  # (B, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, L)
    mask: torch.Tensor  # (B, W) float: 1 where the position predicts a response token that counts
    behaviour_logprobs: torch.Tensor  # (B, W) log pi_behaviour from the rollout engine
    scores: torch.Tensor  # (B,) reward as scored (before the missing-EOS penalty)
    has_eos: torch.Tensor  # (B,) bool: the response ended (EOS or a stop string)
    fresh: torch.Tensor  # (B,) bool: made by the weights the learner holds (staleness 0)
    groups: torch.Tensor  # (B,) long: which prompt (0, 1, ... in order of appearance) it answers
    offset: int = 0
    reference_logprobs: torch.Tensor | None = None
    """(B, W) log pi_ref as the actors computed it (`rollout.reference_logprobs`), else None."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def window(self, rows: torch.Tensor) -> Window:
        assert self.offset == 0, "windows are cut from a full batch"
        width = int(self.attention_mask[rows].sum(1).max())
        start = int(self.mask[rows].any(0).nonzero()[0])
        return Window(rows, start, width)

    def select(self, rows: torch.Tensor) -> Batch:
        return self.cut(self.window(rows))

    def cut(self, w: Window) -> Batch:
        return Batch(
            w.tokens(self.input_ids),
            w.tokens(self.attention_mask),
            w.per_token(self.mask),
            w.per_token(self.behaviour_logprobs),
            self.scores[w.rows],
            self.has_eos[w.rows],
            self.fresh[w.rows],
            self.groups[w.rows],
            offset=w.start,
            reference_logprobs=None if self.reference_logprobs is None else w.per_token(self.reference_logprobs),
        )


@dataclass(frozen=True)
class Experience:
    """Step 3: everything a PPO epoch trains on. Per-token tensors are (B, W)."""

    batch: Batch
    ref_logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    """The proximal policy: the weights before this update."""
    old_values: torch.Tensor
    """The critic's values (zeros without a critic: `ppo.advantage` other than gae)."""
    rewards: torch.Tensor
    """Per-token rewards: the score at the last token, minus the KL penalty per token when it
    goes into the reward (`ppo.kl.placement: reward`)."""
    advantages: torch.Tensor
    returns: torch.Tensor
    """The critic's targets (zeros without a critic)."""
    is_weights: torch.Tensor
    """min(pi_prox / pi_behaviour, C) on the response tokens."""

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.mask

    def select(self, rows: torch.Tensor) -> Experience:
        w = self.batch.window(rows)
        cut = w.per_token
        return Experience(
            self.batch.cut(w),
            cut(self.ref_logprobs),
            cut(self.old_logprobs),
            cut(self.old_values),
            cut(self.rewards),
            cut(self.advantages),
            cut(self.returns),
            cut(self.is_weights),
        )


def tokenize(
    rollouts: list[Rollout], pad_id: int, eos_id: int, truncate: bool, version: int, device: torch.device
) -> Batch:
    """Step 1: right-padded prompt + response ids of the rollouts and the response mask, cut
    after the first EOS when `truncate` (`ppo.truncate_at_stop`). `version` is the learner's:
    records it made are `fresh`. A missing score becomes NaN, which skips the update. The
    reference log-probs come along when every rollout carries them."""
    if not rollouts:
        raise ValueError("no rollouts")
    with_reference = rollouts[0].reference_logprobs is not None
    for r in rollouts:
        if not r.prompt_token_ids or not r.response_token_ids:
            raise ValueError(f"rollout {r.prompt_id}/{r.sample_index}: empty prompt or response")
        for name in ("behaviour_logprobs", "reference_logprobs") if with_reference else ("behaviour_logprobs",):
            values = getattr(r, name)
            if values is None or len(values) != len(r.response_token_ids):
                raise ValueError(
                    f"rollout {r.prompt_id}/{r.sample_index}: {'no' if values is None else len(values)} "
                    f"{name.replace('_', ' ')} for {len(r.response_token_ids)} response tokens"
                )
    input_ids, attention_mask, mask, starts = response_positions(
        [r.prompt_token_ids for r in rollouts], [r.response_token_ids for r in rollouts], pad_id
    )
    behaviour = torch.zeros_like(mask)
    reference = torch.zeros_like(mask) if with_reference else None
    for b, (r, start) in enumerate(zip(rollouts, starts)):
        n = len(r.response_token_ids)
        behaviour[b, start : start + n] = torch.tensor(r.behaviour_logprobs, dtype=torch.float32)
        if reference is not None:
            reference[b, start : start + n] = torch.tensor(r.reference_logprobs, dtype=torch.float32)
    if truncate:
        mask = ppo.mask_after_stop(input_ids[:, 1:], mask, eos_id)
    has_eos = torch.tensor([r.finish_reason == "stop" or eos_id in r.response_token_ids for r in rollouts])
    scores = torch.tensor([math.nan if r.score is None else r.score for r in rollouts], dtype=torch.float32)
    fresh = torch.tensor([r.policy_version == version for r in rollouts])
    index: dict[str, int] = {}
    groups = torch.tensor([index.setdefault(r.prompt_id, len(index)) for r in rollouts])
    return Batch(
        input_ids.to(device),
        attention_mask.to(device),
        mask.to(device),
        behaviour.to(device),
        scores.to(device),
        has_eos.to(device),
        fresh.to(device),
        groups.to(device),
        reference_logprobs=None if reference is None else (reference * mask).to(device),
    )


def make_experience(
    batch: Batch,
    ref_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor | None,
    p: PPOConfig,
    kl_coef: float,
    eos_id: int,
) -> tuple[Experience, dict[str, float]]:
    """Step 3: the rewards (the score at the last token, KL-shaped unless the KL goes into the
    loss: `p.kl.placement`), the advantages and returns of `p.advantage`
    (`ppo.ADVANTAGE_ESTIMATORS`) and the truncated IS weights, over the whole batch.

    ref_logprobs, old_logprobs, old_values: (B, W), from the no-grad passes; old_values is None
    without a critic. `kl_coef` is the KL controller's beta now. Returns the experience and the
    batch's metrics (`experience_metrics`)."""
    mask = batch.mask
    scores = batch.scores
    if p.missing_eos_penalty is not None:
        scores = ppo.apply_missing_eos_penalty(scores, batch.has_eos, p.missing_eos_penalty)
    if p.whiten_rewards and len(batch) > 1:
        scores = ppo.masked_whiten(scores[:, None], torch.ones_like(scores[:, None]), shift_mean=False)[:, 0]
    # With the KL in the loss, the rewards carry the score alone.
    shaping = kl_coef if p.kl.placement == "reward" else 0.0
    rewards, kl = ppo.kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, shaping, p.kl.estimator)
    values = torch.zeros_like(rewards) if old_values is None else old_values
    settings = ppo.AdvantageSettings(p.gamma, p.gae_lambda, p.whiten_advantages, p.grpo_scale_by_std)
    advantages, returns = ppo.ADVANTAGE_ESTIMATORS[p.advantage](rewards, values, mask, batch.groups, settings)
    is_weights = ppo.truncated_importance_weight(old_logprobs, batch.behaviour_logprobs, p.is_cap) * mask
    exp = Experience(batch, ref_logprobs, old_logprobs, values, rewards, advantages, returns, is_weights)
    non_score = (-shaping * kl).sum(1)  # the penalty in the rewards (none when it is in the loss)
    return exp, experience_metrics(exp, scores, kl, non_score, kl_coef, eos_id, with_critic=old_values is not None)


def experience_metrics(
    exp: Experience,
    scores: torch.Tensor,
    kl: torch.Tensor,
    non_score: torch.Tensor,
    kl_coef: float,
    eos_id: int,
    with_critic: bool,
) -> dict[str, float]:
    """The rollout and objective metrics of a batch (TRL's names): `scores` (B,) as shaped
    (after the missing-EOS penalty and whitening), `kl` (B, W) the penalty's per-token
    estimate, `non_score` (B,) each sequence's KL penalty in its rewards."""
    batch, mask, old_logprobs = exp.batch, exp.mask, exp.old_logprobs
    # Behaviour vs proximal: the same weights should give the same log-probs; a large
    # gap means stale rollouts or a weight sync that did not happen.
    delta = (old_logprobs - batch.behaviour_logprobs) * mask
    behaviour_kl = ppo.masked_mean(ppo.kl_k3(batch.behaviour_logprobs, old_logprobs), mask)
    targets = batch.input_ids[:, 1:]
    sequence_kl = kl.sum(1)
    sequence_k3 = (ppo.kl_k3(old_logprobs, exp.ref_logprobs) * mask).sum(1)
    metrics = {
        "objective/kl": sequence_kl.mean(),
        # k3 beside the penalty's estimate (k1 by default), and the largest sequence of
        # each: a mean moved by one sequence is variance, not drift.
        "objective/kl_k3": sequence_k3.mean(),
        "objective/kl_max": sequence_kl.max(),
        "objective/kl_k3_max": sequence_k3.max(),
        "objective/entropy": (-old_logprobs * mask).sum(1).mean(),
        "objective/scores": batch.scores.mean(),
        "objective/non_score_reward": non_score.mean(),
        "objective/rlhf_reward": (scores + non_score).mean(),
        "val/num_eos_tokens": ((targets == eos_id) * mask.bool()).sum(),
        "rollout/behaviour_kl": behaviour_kl,
        "rollout/max_abs_logp_delta": delta.abs().max(),
        # The engine against the learner's own arithmetic (learner.compute_dtype): on
        # records of the weights it holds, all of the gap is numerics.
        "val/logp_gap_mean": ppo.masked_mean(delta.abs(), mask),
        "rollout/is_weight_mean": ppo.masked_mean(exp.is_weights, mask),
        "rollout/response_tokens_mean": mask.sum(1).mean(),
        "learner/kl_coef": kl_coef,
    }
    if with_critic:
        metrics["val/mean"] = ppo.masked_mean(exp.old_values, mask)
    if batch.fresh.any():
        metrics["val/logp_gap_fresh_mean"] = ppo.masked_mean(delta.abs(), mask * batch.fresh[:, None])
    return {k: float(v) for k, v in metrics.items()}
