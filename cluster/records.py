"""The typed records that cross process boundaries between the roles.

Rollout actors, the reward service and the learner never import each other; they share
these records (and `cluster.config`). This module imports nothing else of the project and
nothing heavier than numpy, so every role can load it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    """Byte offset in the flat buffer."""


@dataclass(frozen=True)
class WeightsHandle:
    """A published policy version: one flat byte buffer in the Ray object store plus its layout."""

    version: int
    buffer: Any
    """ray.ObjectRef of a 1-D uint8 numpy array holding every tensor back to back."""
    specs: tuple[TensorSpec, ...]
    fingerprint: tuple[float, float]
    """(sum, sum of squares) in float64 over every element: the same however an engine fuses
    or orders its parameters, so an actor can prove what it loaded."""
    nbytes: int


def pack_state_dict(state: dict[str, Any], dtype: Any = None,
                    out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[TensorSpec, ...]]:
    """Copy named torch tensors into one flat uint8 buffer (zero-copy to read from Ray).

    `out`, when given, is a writable uint8 buffer of at least the needed size to pack into
    (the returned array is a view of its first bytes). A publisher that reuses one buffer
    for every version avoids faulting in fresh pages each time, which costs far more than
    the copy itself (about 1.5 s against 0.06 s for 345 MB on the development machines).
    """
    import torch

    tensors = {k: (v.detach().to(dtype) if dtype is not None else v.detach()).contiguous().cpu()
               for k, v in state.items()}
    specs, offset = [], 0
    for name, t in tensors.items():
        specs.append(TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), offset))
        offset += t.numel() * t.element_size()
        offset += -offset % 64  # keep every tensor 64-byte aligned
    if out is None:
        flat = np.empty(offset, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.ndim != 1 or out.nbytes < offset or not out.flags.writeable:
        raise ValueError(f"pack_state_dict: out must be a writable flat uint8 array of at least "
                         f"{offset} bytes, got {out.dtype}{list(out.shape)}")
    else:
        flat = out[:offset]
    flat_t = torch.from_numpy(flat)
    for spec, t in zip(specs, tensors.values()):
        n = t.numel() * t.element_size()
        flat_t[spec.offset: spec.offset + n].copy_(t.view(-1).view(torch.uint8))
    return flat, tuple(specs)


def unpack_state_dict(flat: np.ndarray, specs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    """Views (no copy) of the named tensors inside a flat buffer made by `pack_state_dict`."""
    import warnings

    import torch

    if flat.flags.writeable:
        base = torch.from_numpy(flat)
    else:
        # A buffer from ray.get is read-only shared memory; torch warns that writing to it
        # would be undefined. The views are only ever read (copied into a model), so the
        # warning says nothing here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            base = torch.frombuffer(memoryview(flat), dtype=torch.uint8)
    out = {}
    for spec in specs:
        dtype = getattr(torch, spec.dtype)
        numel = int(np.prod(spec.shape)) if spec.shape else 1
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        out[spec.name] = base[spec.offset: spec.offset + nbytes].view(dtype).view(spec.shape)
    return out


def fingerprint(tensors: Any) -> tuple[float, float]:
    """(sum, sum of squares) of every element in float64: invariant to fusing and reordering."""
    import torch

    total, squares = 0.0, 0.0
    for t in tensors:
        t64 = t.detach().to(torch.float64)
        total += float(t64.sum())
        squares += float((t64 * t64).sum())
    return total, squares


def fingerprints_match(a: tuple[float, float], b: tuple[float, float], rtol: float = 1e-6) -> bool:
    return all(abs(x - y) <= rtol * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))


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
