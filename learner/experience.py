"""The experience of one update, built in steps, each a record with every field set:

1. `tokenize`: scored rollouts -> `Batch` (token ids, masks, behaviour log-probs, scores,
   and the reference log-probs when the actors computed them);
2. the learner's no-grad passes -> reference (unless given) and proximal log-probs, old values;
3. `Experience`: the batch with those and the shaped rewards, advantages, returns and
   importance weights: what the PPO epochs train on.

Token tensors are (B, L), per-token tensors (B, W) over the prediction positions
`offset .. offset + W - 1` (position t predicts input_ids[:, t + 1]). `select` cuts rows to
the columns they need: up to their longest sequence, and per-token tensors from their
earliest response token, so prompt positions no row needs never reach the LM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cluster.shared.logprobs import response_positions
from cluster.shared.records import Rollout
from learner import ppo


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
        return t[self.rows, self.start: self.width - 1]

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
        return Batch(w.tokens(self.input_ids), w.tokens(self.attention_mask), w.per_token(self.mask),
                     w.per_token(self.behaviour_logprobs), self.scores[w.rows], self.has_eos[w.rows],
                     self.fresh[w.rows], self.groups[w.rows], offset=w.start,
                     reference_logprobs=None if self.reference_logprobs is None
                     else w.per_token(self.reference_logprobs))


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
        return Experience(self.batch.cut(w), cut(self.ref_logprobs), cut(self.old_logprobs),
                          cut(self.old_values), cut(self.rewards), cut(self.advantages),
                          cut(self.returns), cut(self.is_weights))


def tokenize(rollouts: list[Rollout], pad_id: int, eos_id: int, truncate: bool, version: int,
             device: torch.device) -> Batch:
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
                raise ValueError(f"rollout {r.prompt_id}/{r.sample_index}: {'no' if values is None else len(values)} "
                                 f"{name.replace('_', ' ')} for {len(r.response_token_ids)} response tokens")
    input_ids, attention_mask, mask, starts = response_positions(
        [r.prompt_token_ids for r in rollouts], [r.response_token_ids for r in rollouts], pad_id)
    behaviour = torch.zeros_like(mask)
    reference = torch.zeros_like(mask) if with_reference else None
    for b, (r, start) in enumerate(zip(rollouts, starts)):
        n = len(r.response_token_ids)
        behaviour[b, start: start + n] = torch.tensor(r.behaviour_logprobs, dtype=torch.float32)
        if reference is not None:
            reference[b, start: start + n] = torch.tensor(r.reference_logprobs, dtype=torch.float32)
    if truncate:
        mask = ppo.mask_after_stop(input_ids[:, 1:], mask, eos_id)
    has_eos = torch.tensor([r.finish_reason == "stop" or eos_id in r.response_token_ids for r in rollouts])
    scores = torch.tensor([math.nan if r.score is None else r.score for r in rollouts], dtype=torch.float32)
    fresh = torch.tensor([r.policy_version == version for r in rollouts])
    index: dict[str, int] = {}
    groups = torch.tensor([index.setdefault(r.prompt_id, len(index)) for r in rollouts])
    return Batch(input_ids.to(device), attention_mask.to(device), mask.to(device), behaviour.to(device),
                 scores.to(device), has_eos.to(device), fresh.to(device), groups.to(device),
                 reference_logprobs=None if reference is None else (reference * mask).to(device))
