"""The typed records that cross process boundaries between the roles.

Rollout actors, the reward service and the learner never import each other; they share
these records and the rest of `cluster.shared`. Plain dataclasses, so every role loads them
cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transport imports numpy: the records stay cheap to load
    from cluster.shared.transport import WeightsHandle


@dataclass(frozen=True)
class Prompt:
    """One user-style prompt handed to a rollout actor."""

    prompt_id: str
    """Unique within a run: `<epoch>:<index in the data file>`."""
    messages: tuple[tuple[str, str], ...]
    """Chat turns as (role, content); a plain-text prompt is one ("user", text) turn."""

    @property
    def text(self) -> str:
        """The last user turn: what reward functions and judges see as the prompt."""
        return self.messages[-1][1]


@dataclass
class Rollout:
    """One completion of one prompt, made by one policy version, with its score."""

    prompt_id: str
    sample_index: int
    """Which of the `samples_per_prompt` completions of this prompt this is."""
    prompt_text: str
    """The prompt as the reward service sees it (the last user turn)."""
    prompt_token_ids: list[int]
    """The prompt after the chat template, as the policy saw it."""
    response_token_ids: list[int]
    response_text: str
    behaviour_logprobs: list[float]
    """log pi_behaviour(token) of each response token at the sampling temperature."""
    finish_reason: str
    """"stop" (EOS or a stop string) or "length" (max_new_tokens reached)."""
    policy_version: int
    """Version of the weights that generated it: 0 is the SFT model."""
    actor_id: int
    generate_seconds: float
    """Wall time of the generation call that made it (shared by its batch)."""
    score: float | None = None
    """Reward (model score plus weighted rule rewards); None until scored."""
    score_seconds: float = 0.0
    reference_logprobs: list[float] | None = None
    """log pi_ref(token) of each response token under the frozen reference model, at the
    sampling temperature, when the actor computes them (`rollout.reference_logprobs`)."""
    reward_std: float | None = None
    """How far the members of a reward-model ensemble disagree on this completion: the
    population std of their scores (0 with one reward model); None when the scorer does not say."""
    token_versions: list[int] | None = None
    """The policy version of the engine step that sampled each response token, from an actor
    generating continuously (`actors/continuous.py`): weights loaded while a response was
    generated make it span versions, `policy_version` being its oldest. None: all are that one."""


@dataclass(frozen=True)
class Scores:
    """The reward service's answer to one scoring call, item by item in the call's order."""

    rewards: list[float]
    """The reward of each item: the aggregated model score x model_weight plus the rule rewards."""
    reward_std: list[float]
    """The population std of each item's reward-model scores (0 with fewer than two models).
    The scores themselves stay in the service (`POST /v1/score` with `members`)."""


@dataclass
class RolloutBatch:
    """What one actor returns for one generation call: the prompts that ended in it, their
    scored rollouts, and its timings."""

    actor_id: int
    policy_version: int
    """The oldest version any of its prompts started under."""
    rollouts: list[Rollout]
    prompt_ids: list[str]
    """Every prompt that ended, also those whose rollouts failed (for exact accounting)."""
    prompt_versions: list[int] = field(default_factory=list)
    """The version each prompt of `prompt_ids` started under."""
    failed_prompt_ids: list[str] = field(default_factory=list)
    """Prompts that could not be scored: they are handed out again, never scored as 0."""
    score_error: str | None = None
    """Why scoring failed, when it failed for the whole call."""
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    score_seconds: float = 0.0
    reference_seconds: float = 0.0
    """The reference log-prob pass, made while the reward service scores."""
    engine_steps: int = 0
    """Engine steps the call made."""
    engine_sequences: int = 0
    """Sequences that made a token, summed over those steps: / engine_steps is the engine's
    mean occupancy."""


@dataclass(frozen=True)
class LoadResult:
    """What a rollout actor's `load_weights` did, and whether it proved the load."""

    policy_version: int
    """The version the engine holds afterwards."""
    loaded: bool
    """Whether new weights went into the engine (False: it held this version or a newer one)."""
    verified: bool | None
    """The engine's probes matched the published ones; None when the handle was older than
    what the engine holds, and nothing was checked."""
    problem: str | None = None
    """Why verification failed, naming the tensor."""
    probe_rms_error: float = 0.0
    """The worst tensor's relative RMS probe difference."""
    seconds: float = 0.0
    """Wall time of the whole call: fetch, reload and verification."""
    fetch_seconds: float = 0.0
    reload_seconds: float = 0.0
    verify_seconds: float = 0.0
    bytes: int = 0
    """Bytes loaded (0 when nothing was)."""
    direct: bool = False
    """The load rebuilt the engine's CPU kernels itself instead of going through vLLM's
    reload (`actors.weights.load_into_engine`)."""


@dataclass(frozen=True)
class UpdateResult:
    """What one learner update did."""

    version: int
    """The learner's policy version afterwards."""
    skipped: bool
    """NaN or Inf made the learner skip it: nothing was trained, the version did not move,
    and the batch's prompts must be handed out again."""
    metrics: dict[str, float]
    """The update's metrics, by W&B name."""
    weights: WeightsHandle | None = None
    """The new version's handle, published as the update's last step; None when skipped."""
