"""Continuous generation: an in-process vLLM engine kept full, each prompt's samples handed
back the moment the last of them ends, every token tagged with the weights version that made it.

vLLM's `LLM.generate` takes a call of prompts and returns when the longest response ends; as
the short ones finish the engine's batch shrinks, and with long-tailed response lengths the
last steps run with a handful of sequences. `Continuous` steps the engine itself
(`LLMEngine.step`, what `LLM.generate` runs in a loop), so its owner can add prompts whenever
samples finish and take finished prompts out at once. Between two steps the owner may load
new weights (`weights_changed`: the KV cache of the requests in flight kept or recomputed),
and the tokens the requests make from then on carry the new version.

Each sample is a request of its own (n = 1), streamed as deltas: vLLM fans a request with
n > 1 out into such requests anyway, and the deltas are what tags each token with the
version of the step that sampled it.

The rollout actor generates only through it (`RolloutActor.collect`); docs/continuous.md
says how the loop uses it and what it measured.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.engine import FINISH_REASONS, sampled_logprobs
from cluster.shared.records import Prompt, Rollout


@dataclass
class Sample:
    """One response as the engine streams it."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    """The weights version of the step that sampled each token."""
    text: str = ""
    """The response as vLLM detokenized it (with stop strings; else empty)."""
    finish_reason: str | None = None


@dataclass
class Started:
    """A prompt whose samples are in the engine, from the version it started under."""

    prompt: Prompt
    prompt_ids: list[int]
    version: int
    samples: list[Sample]
    added: float = field(default_factory=time.perf_counter)
    ended: float | None = None

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


@dataclass
class Occupancy:
    """How full the engine ran: sequences that made a token, summed over steps."""

    steps: int = 0
    sequences: int = 0
    tokens: int = 0

    @property
    def mean(self) -> float:
        """Mean sequences per decoding step (0 before any step)."""
        return self.sequences / self.steps if self.steps else 0.0

    def snapshot(self) -> Occupancy:
        return Occupancy(self.steps, self.sequences, self.tokens)


class Continuous:
    """Drives one vLLM `LLM`'s engine a step at a time. Not thread-safe: one owner adds,
    steps and loads weights between steps."""

    def __init__(self, llm: Any, params: Any):
        self._engine = llm.llm_engine
        self.samples_per_prompt = params.n
        self._params = _streamed(params)
        self._ids = itertools.count()
        self._started: dict[int, Started] = {}
        self._requests: dict[str, tuple[int, int]] = {}  # request id -> (prompt key, sample index)
        self.occupancy = Occupancy()

    @property
    def sequences(self) -> int:
        """Samples in the engine: running, waiting or preempted."""
        return len(self._requests)

    @property
    def prompts(self) -> int:
        """Prompts with a sample in the engine."""
        return len(self._started)

    def add(
        self, prompt: Prompt, prompt_ids: Sequence[int], version: int, adapter: Any = None, params: Any = None
    ) -> None:
        """Start `samples_per_prompt` samples of `prompt` under the weights of `version` (and
        the LoRA adapter `adapter`, a `LoRARequest`, when given), with the sampling
        parameters given at construction or `params`."""
        from vllm.inputs import TokensPrompt

        params = self._params if params is None else _streamed(params)
        key = next(self._ids)
        samples = [Sample() for _ in range(self.samples_per_prompt)]
        self._started[key] = Started(prompt, list(prompt_ids), version, samples)
        for index in range(self.samples_per_prompt):
            request_id = f"{key}-{index}"
            self._requests[request_id] = (key, index)
            self._engine.add_request(
                request_id,
                # Cached prefixes are the version's own: a request never reuses keys and
                # values that another version's weights computed.
                TokensPrompt(prompt_token_ids=list(prompt_ids), cache_salt=f"version-{version}"),
                params,
                lora_request=adapter,
            )

    def weights_changed(self, kv: str = "keep") -> None:
        """New weights were loaded between two steps; what becomes of the keys and values of
        the requests in flight, computed by the old ones: `keep` them (the requests go on at
        once, their next tokens attending to the old keys), or `recompute` them (vLLM preempts
        every running request and recomputes its whole sequence under the new weights before
        its next token)."""
        if kv not in ("keep", "recompute"):
            raise ValueError(f"kv must be 'keep' or 'recompute', not {kv!r}")
        if kv == "recompute":
            self._engine.reset_prefix_cache(reset_running_requests=True)

    def step(self, version: int | None) -> list[Started]:
        """One engine step under the weights of `version` (None: each request's own start
        version, as with LoRA, where a request keeps its adapter to the end); returns the
        prompts whose last sample it ended, in the order they ended."""
        outputs = self._engine.step()
        finished, producing, made = [], 0, 0
        for output in outputs:
            key, index = self._requests[output.request_id]
            started = self._started[key]
            sample = started.samples[index]
            (completion,) = output.outputs
            new = list(completion.token_ids)
            sample.token_ids += new
            sample.text += completion.text
            sample.logprobs += sampled_logprobs(completion)
            sample.versions += [started.version if version is None else version] * len(new)
            producing += bool(new)
            made += len(new)
            if output.finished:
                sample.finish_reason = completion.finish_reason
                del self._requests[output.request_id]
                if started.done:
                    del self._started[key]
                    started.ended = time.perf_counter()
                    finished.append(started)
        if producing:
            self.occupancy.steps += 1
            self.occupancy.sequences += producing
            self.occupancy.tokens += made
        return finished

    def drain(self, version: int | None) -> list[Started]:
        """Step until nothing is left in the engine; every prompt that ended, in order."""
        finished = []
        while self._requests:
            finished += self.step(version)
        return finished


def to_rollouts(started: Started, actor_id: int, tokenizer: Any = None) -> list[Rollout]:
    """The records of a prompt that ended, in sample order: each made by the version it
    started under (`policy_version`), with the version of every token. With `tokenizer`, the
    text is decoded from the tokens (for samples vLLM did not detokenize)."""
    rollouts = []
    for index, sample in enumerate(started.samples):
        text = tokenizer.decode(sample.token_ids, skip_special_tokens=True) if tokenizer else sample.text
        finish = FINISH_REASONS.get(sample.finish_reason)
        if finish is None:
            raise RuntimeError(f"vLLM ended prompt {started.prompt.prompt_id!r} with {sample.finish_reason!r}")
        rollouts.append(
            Rollout(
                prompt_id=started.prompt.prompt_id,
                sample_index=index,
                prompt_text=started.prompt.text,
                prompt_token_ids=list(started.prompt_ids),
                response_token_ids=sample.token_ids,
                response_text=text,
                behaviour_logprobs=sample.logprobs,
                finish_reason=finish,
                policy_version=started.version,
                actor_id=actor_id,
                generate_seconds=(started.ended or time.perf_counter()) - started.added,
                token_versions=sample.versions,
            )
        )
    return rollouts


def _streamed(params: Any) -> Any:
    """`params` for one sample streamed as deltas."""
    from vllm.sampling_params import RequestOutputKind

    params = params.clone()
    params.n = 1
    params.output_kind = RequestOutputKind.DELTA
    return params
