"""The typed records that cross process boundaries between the roles.

Rollout actors, the reward service and the learner never import each other; they share
these records (and `cluster.config`). This module imports nothing else of the project and
nothing heavier than numpy, so every role can load it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any



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


@dataclass
class RolloutBatch:
    """What one actor returns for one generation call: scored rollouts and its timings."""

    actor_id: int
    policy_version: int
    rollouts: list[Rollout]
    prompt_ids: list[str]
    """Every prompt of the call, also those whose rollouts failed (for exact accounting)."""
    failed_prompt_ids: list[str] = field(default_factory=list)
    """Prompts that could not be scored: they are handed out again, never scored as 0."""
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    score_seconds: float = 0.0


# ---------------------------------------------------------------- how text becomes tokens
# One definition, used by the actors (generation), the learner (SFT) and the reward model
# (training and serving), so that every role sees a (prompt, response) pair as the same ids.


def prompt_token_ids(tokenizer: Any, messages: Any, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt as the policy sees it: the chat template with the assistant
    turn opened, or the raw text of the last turn when `chat_template` is false."""
    turns = [{"role": r, "content": c} for r, c in messages] if not isinstance(messages, str) \
        else [{"role": "user", "content": messages}]
    if chat_template:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(turns[-1]["content"], add_special_tokens=False)["input_ids"]


def response_token_ids(tokenizer: Any, response: str, add_eos: bool = True) -> list[int]:
    """Token ids of a response as the policy would generate it, ending with EOS."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids
