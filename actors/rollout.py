"""The rollout actor: one in-process vLLM engine that turns prompts into scored rollouts.

A plain class; `cluster/` makes it a Ray actor with
`ray.remote(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus)`, so on a GPU
cluster each actor holds its own device. Its engine is kept full (`actors/continuous.py`):
each `collect` call starts the prompts it is given beside those in flight, steps the engine
until some end, builds their records and scores them through the reward service (with
`rollout.reference_logprobs`, computing their reference log-probs meanwhile).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from actors.adapters import adapter_probes, load_adapter, lora_request, remove_adapter
from actors.continuous import Continuous, Occupancy, Started, to_rollouts
from actors.engine import apply_scores, build_engine, configure_vllm_env, encode_prompts, sampling_params
from actors.reference import Reference
from actors.weights import checkpoint_layout, engine_probes, load_into_engine, loads_directly, validate_specs
from cluster.shared.config import TameConfig
from cluster.shared.lora import adapter_layout
from cluster.shared.records import LoadResult, Prompt, Rollout, RolloutBatch, Scores
from cluster.shared.startup import heavy_imports
from cluster.shared.tokens import pad_token_id
from cluster.shared.transport import ObjectStoreTransport, WeightsHandle, WeightTransport, compare_probes

log = logging.getLogger(__name__)

RETURN_AFTER_S = 0.25
"""A collect call returns after this long at most (sooner once a quarter of the actor's
prompts have ended): ended prompts reach the learner, new prompts the engine, and a newer
version loads, within about this long; what a return costs is a Ray call, about a millisecond."""

Scorer = Callable[[list[str], list[str]], Sequence[float] | Scores]
"""scorer(prompt_texts, response_texts) -> scores in the same order, or a `Scores` record that
also says how far an ensemble's reward models disagree (`RewardClient(with_spread=True)`);
raises when it cannot."""


class RolloutActor:
    """Owns one vLLM engine; generates completions tagged with the policy version that made them."""

    def __init__(self, cfg: TameConfig, actor_id: int, scorer: Scorer | None = None):
        configure_vllm_env(cfg.rollout.threads or max(1, int(cfg.rollout.num_cpus)))
        with heavy_imports():
            from transformers import AutoTokenizer

        self.cfg = cfg
        self.actor_id = actor_id
        self._scorer = scorer
        # Each actor draws its own samples: the same seed would give every actor the same
        # completions of the same prompt.
        self._llm = build_engine(cfg, seed=cfg.run.seed + actor_id)
        self._tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy)
        self._params = sampling_params(cfg)
        self._lora = cfg.learner.lora
        if self._lora is None:
            self._layout = checkpoint_layout(cfg.model.policy)
            self._direct = loads_directly(self._llm, cfg.model.policy)
            log.info(
                "actor %d: weight loads %s",
                actor_id,
                "rebuild the CPU kernels directly" if self._direct else "go through vLLM's reload",
            )
        else:
            self._layout = adapter_layout(cfg)
            self._direct = False
        self._version = 0  # the weights on disk at cfg.model.policy
        self._adapters: list[int] = []  # with LoRA: the versions whose adapters the engine holds, oldest first
        self._transport: WeightTransport = ObjectStoreTransport()
        self._stepper = Continuous(self._llm, self._params)
        self._reference = None
        if cfg.rollout.reference_logprobs:
            self._reference = Reference(cfg, pad_token_id(self._tokenizer))
            # Scoring waits on the reward service in this thread while the reference computes.
            self._scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self._warm_up()

    def _warm_up(self) -> None:
        # The first steps on CPU spend seconds preparing kernels; pay them before the actor
        # reports ready, so the first real batch is timed fairly.
        prompt = Prompt("warm-up", (("user", "Hello"),))
        ids = encode_prompts(self._tokenizer, [prompt], self.cfg.data.chat_template, self.cfg.rollout.max_model_len)
        self._stepper.add(prompt, ids[0], self._version, params=sampling_params(self.cfg, max_new_tokens=4))
        self._stepper.drain(self._version)
        if self._reference is not None:
            eos = self._tokenizer.eos_token_id
            self._reference.annotate(
                [Rollout("warm-up", 0, "", ids[0], [eos], "", [0.0], "stop", 0, self.actor_id, 0.0)]
            )

    def set_scorer(self, scorer: Scorer | None) -> None:
        """Attach the scorer of an actor started before the reward service was up."""
        self._scorer = scorer

    def ready(self) -> dict:
        """Identity and loaded version."""
        return {"actor_id": self.actor_id, "pid": os.getpid(), "policy_version": self._version}

    def probes(self) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
        """The engine's probes and fusion map (`actors.weights.engine_probes`)."""
        return engine_probes(self._llm)

    def policy_version(self) -> int:
        return self._version

    def collect(self, prompts: Sequence[Prompt] = (), max_steps: int | None = None) -> RolloutBatch:
        """Start `prompts` beside those in flight, step the engine until some end, and return
        those, scored (`samples_per_prompt` completions each).

        The engine is kept full: a call returns once a quarter of the actor's prompts have
        ended or `RETURN_AFTER_S` has passed (or nothing is left, or after `max_steps` steps),
        and the next call starts more. Weights loaded between two calls (`load_weights`) load
        between two engine steps; the prompts in flight go on under them
        (`rollout.inflight_updates`), their later tokens carrying the new version
        (`Rollout.token_versions`). Prompts whose completions could not be scored are
        listed in `failed_prompt_ids` and their rollouts left out: they are handed out again,
        never scored as 0.
        """
        start = time.perf_counter()
        self._submit(prompts)
        stepper, quarter = self._stepper, max(1, self.cfg.rollout.prompts_per_batch // 4)
        ended, steps, since = [], 0, stepper.occupancy.snapshot()
        while stepper.sequences and steps != max_steps:
            ended += stepper.step(self._step_version)
            steps += 1
            if max_steps is None and (len(ended) >= quarter or time.perf_counter() - start > RETURN_AFTER_S):
                break
        return self._batch(ended, start, since)

    def generate(self, prompts: Sequence[Prompt]) -> RolloutBatch:
        """`prompts` generated to their end beside nothing else, in their order: a call at a
        time, for tools and tests (the loop uses `collect`)."""
        if self._stepper.sequences:
            raise RuntimeError("generate would step the engine under prompts in flight: collect them first")
        start = time.perf_counter()
        self._submit(prompts)
        since = self._stepper.occupancy.snapshot()
        ended = self._stepper.drain(self._step_version)
        order = {p.prompt_id: i for i, p in enumerate(prompts)}
        ended.sort(key=lambda s: order[s.prompt.prompt_id])
        return self._batch(ended, start, since)

    @property
    def _step_version(self) -> int | None:
        """The version the engine's next step samples with; None with LoRA, where a request
        keeps the adapter it started with, so its tokens are its start version's."""
        return self._version if self._lora is None else None

    def _submit(self, prompts: Sequence[Prompt]) -> None:
        """Start `prompts` under the weights the engine holds now (with LoRA, this version's
        adapter, held until no prompt can be in flight under it)."""
        ids = encode_prompts(self._tokenizer, prompts, self.cfg.data.chat_template, self.cfg.rollout.max_model_len)
        adapter = lora_request(self._version) if self._lora is not None and self._adapters else None
        for prompt, prompt_ids in zip(prompts, ids):
            self._stepper.add(prompt, prompt_ids, self._version, adapter)

    def _batch(self, ended: list[Started], start: float, since: Occupancy) -> RolloutBatch:
        """The batch of the prompts that `ended` in a call that began at `start`, scored here,
        so the records reach the reward service without a detour through the controller, with
        their reference log-probs computed meanwhile; `since` is the engine's occupancy then."""
        tokenizer = None if self._params.detokenize else self._tokenizer
        rollouts = [r for started in ended for r in to_rollouts(started, self.actor_id, tokenizer)]
        batch = RolloutBatch(
            actor_id=self.actor_id,
            policy_version=min((s.version for s in ended), default=self._version),
            rollouts=rollouts,
            prompt_ids=[s.prompt.prompt_id for s in ended],
            prompt_versions=[s.version for s in ended],
            generated_tokens=sum(len(r.response_token_ids) for r in rollouts),
            generate_seconds=time.perf_counter() - start,
            engine_steps=self._stepper.occupancy.steps - since.steps,
            engine_sequences=self._stepper.occupancy.sequences - since.sequences,
        )
        if self._reference is not None and rollouts:
            scoring = self._scoring.submit(self._score, batch) if self._scorer is not None else None
            try:
                batch.reference_seconds = self._reference.annotate(rollouts)
            finally:  # the call ends with its scoring, whatever happened here
                if scoring is not None:
                    scoring.result()
        elif self._scorer is not None and rollouts:
            self._score(batch)
        return batch

    def _load_adapter(self, version: int, tensors: dict) -> None:
        """Put `version`'s adapter into the engine; drop the oldest beyond what calls may still
        use (`cluster.shared.lora.engine_args`: max_staleness + 2)."""
        load_adapter(self._llm, tensors, version, self._lora)
        self._adapters.append(version)
        while len(self._adapters) > self.cfg.train.max_staleness + 2:
            remove_adapter(self._llm, self._adapters.pop(0))

    def _score(self, batch: RolloutBatch) -> None:
        start = time.perf_counter()
        try:
            scores = self._scorer([r.prompt_text for r in batch.rollouts], [r.response_text for r in batch.rollouts])
            batch.score_seconds = time.perf_counter() - start
            failed = apply_scores(batch.rollouts, scores, batch.score_seconds)
        except Exception as e:  # the reward service's failure must not stop generation
            batch.score_seconds = time.perf_counter() - start
            log.warning("actor %d: scoring %d responses failed: %r", self.actor_id, len(batch.rollouts), e)
            batch.score_error = f"{type(e).__name__}: {e}"[:1000]
            failed = {r.prompt_id for r in batch.rollouts}
        if failed:
            batch.failed_prompt_ids = [pid for pid in batch.prompt_ids if pid in failed]
            batch.rollouts = [r for r in batch.rollouts if r.prompt_id not in failed]

    def load_weights(self, handle: WeightsHandle) -> LoadResult:
        """Load a newer policy version into the live engine, then prove what it holds.

        The handle is checked against the engine's checkpoint layout before any weight is
        touched: a broken handle raises `WeightsMismatchError` and the engine keeps serving
        its previous weights. After the load (or for the version already held) the engine's
        probes are compared with the published ones. An older version is a no-op.
        """
        start = time.perf_counter()
        if handle.version < self._version:
            return LoadResult(self._version, loaded=False, verified=None)
        loaded = {}
        # With LoRA, version 0 is an adapter too (B = 0): every version is served as one.
        if handle.version > self._version or (self._lora is not None and handle.version not in self._adapters):
            validate_specs(handle.specs, self._layout)
            # Views of the object store's memory go straight into the engine: no staging copy.
            tensors = self._transport.fetch(handle)
            fetched = time.perf_counter()
            path = "direct" if self._direct else "vllm"
            if self._lora is None:
                # Prefixes are cached per version (actors/continuous.py), so the cache needs no
                # reset with requests in flight; `recompute` drops their keys and values too.
                in_flight = self._stepper.sequences > 0
                path = load_into_engine(self._llm, tensors, self._direct, reset_prefix_cache=not in_flight)
                if in_flight and self.cfg.rollout.inflight_updates == "recompute":
                    self._stepper.weights_changed("recompute")
            else:
                self._load_adapter(handle.version, tensors)
            self._version = handle.version
            loaded = {
                "loaded": True,
                "bytes": handle.nbytes,
                "fetch_seconds": fetched - start,
                "reload_seconds": time.perf_counter() - fetched,
                "direct": path == "direct",
            }

        verifying = time.perf_counter()
        expected = self._transport.probes(handle)
        if self._lora is None:
            measured, fused = engine_probes(self._llm)
        else:  # the adapter's A and B as the engine's slot holds them
            measured, fused = adapter_probes(self._llm, handle.version, self._lora), {}
            measured = {name: probe for name, probe in measured.items() if name in expected}
        copies = {spec.name for spec in handle.specs if len(spec.shape) <= 1}
        check = compare_probes(measured, expected, fused, exact=copies)
        done = time.perf_counter()
        return LoadResult(
            **{"loaded": False, **loaded},
            policy_version=self._version,
            verified=check.ok,
            problem=check.problem,
            probe_rms_error=check.rms_error,
            verify_seconds=done - verifying,
            seconds=done - start,
        )
