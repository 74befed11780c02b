"""The experience pipeline between the rollout actors and the learner, as pure bookkeeping.

No Ray and no clock: the controller tells it what happened (an actor started prompts, some of
them ended, an update started or ended) and asks it two questions: how many prompts may an
actor start now, and is a batch ready to train. `tests/test_pipeline.py` drives the same
object on a simulated clock.

Staleness. A record made by policy version v and trained by the update from version V has
staleness V - v, at most `max_staleness` (k). Records are trained in the order they were
started, B (`train.rollout_batch_size`) per update, so a sample with p samples ahead of it
(in the update in flight, in the queue, being generated) is trained from version
V + floor(p / B), where V is the learner's newest version. The admission rule follows: an
actor holding version v may start n more samples only if

    p + n <= (k + 1 + v - V) * B

which is AReaL's rule (Fu et al. 2025: samples started by versions <= v number at most
(v + k + 1) * B) counted from the samples not yet trained. An actor that loads newer weights
while a prompt is in flight (`rollout.inflight_updates`) makes its later tokens with them; the
prompt still counts from the version it started under, its oldest token's, so the rule and
the bound hold for it unchanged. With k = 0 an actor waits for
each update (synchronous PPO); with k >= 1 it generates the next batch while the learner
trains, and no sample is ever generated only to be dropped. Dropping a record older than
k versions remains as a counted guard for what the order cannot promise (several actors
finishing out of order, an actor scaled in while it held old weights).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from cluster.shared.config import TameConfig
from cluster.shared.records import Rollout


@dataclass
class PromptGroup:
    """The completions of one prompt, kept together through the queue and trained in one update."""

    prompt_id: str
    policy_version: int
    rollouts: list[Rollout]

    def __len__(self) -> int:
        return len(self.rollouts)


@dataclass
class Pipeline:
    batch_size: int
    """B: samples per learner update."""
    max_staleness: int
    """k: the largest learner version minus record version that may be trained."""
    samples_per_prompt: int
    """Completions per prompt: an actor starts whole prompts."""
    max_prompts_per_call: int
    """Most prompts one actor holds in flight at once (`rollout.prompts_per_batch`)."""
    max_waiting: int
    """Most samples queued or being generated at once (`train.queue_size` actors' worth),
    never fewer than a batch: the learner waits for a whole one."""
    version: int = 0
    """V: the learner's newest version, which the next (or the current) update trains from."""
    queue: list[PromptGroup] = field(default_factory=list)
    training: list[PromptGroup] | None = None
    """The batch of the update in flight."""
    generating: dict[int, Counter[int]] = field(default_factory=dict)
    """Each actor's samples in flight by the policy version they started under."""
    generating_samples: int = 0
    queued_samples: int = 0
    training_samples: int = 0
    """These three sums are kept as they change: the admission rule is asked once per idle
    actor, and a pool of hundreds asks often."""

    def __post_init__(self) -> None:
        self.max_waiting = max(self.max_waiting, self.batch_size)

    @classmethod
    def for_run(cls, cfg: TameConfig, version: int) -> Pipeline:
        """The pipeline of a run's config, from the learner's `version` on."""
        per_prompt = cfg.rollout.sampling.samples_per_prompt
        return cls(
            batch_size=cfg.train.rollout_batch_size,
            max_staleness=cfg.train.max_staleness,
            samples_per_prompt=per_prompt,
            max_prompts_per_call=cfg.rollout.prompts_per_batch,
            max_waiting=cfg.train.queue_size * cfg.rollout.prompts_per_batch * per_prompt,
            version=version,
        )

    # ----------------------------------------------------------------- counts

    def samples_waiting(self) -> int:
        """Samples queued or being generated."""
        return self.queued_samples + self.generating_samples

    def samples_ahead(self) -> int:
        """Samples started and not trained yet: in training, queued, being generated."""
        return self.training_samples + self.samples_waiting()

    def most_calls(self) -> int:
        """The most actors the admission rule keeps busy at once: each holding
        `max_prompts_per_call` prompts, together everything it admits ahead of the learner."""
        admitted = min((self.max_staleness + 1) * self.batch_size, self.max_waiting)
        return max(1, -(-admitted // (self.max_prompts_per_call * self.samples_per_prompt)))

    # ----------------------------------------------------------------- actors

    def prompts_to_start(self, actor_version: int, held: int = 0) -> int:
        """How many prompts an actor holding `actor_version`, with `held` prompts in flight
        already, may start now (0: wait)."""
        bound = (self.max_staleness + 1 + actor_version - self.version) * self.batch_size
        room = min(bound - self.samples_ahead(), self.max_waiting - self.samples_waiting())
        return max(0, min(self.max_prompts_per_call - held, room // self.samples_per_prompt))

    def started(self, actor_id: int, n_prompts: int, version: int) -> None:
        """The actor started `n_prompts` prompts under `version`."""
        self.generating.setdefault(actor_id, Counter())[version] += n_prompts * self.samples_per_prompt
        self.generating_samples += n_prompts * self.samples_per_prompt

    def finished(self, actor_id: int, groups: Iterable[PromptGroup], ended: Iterable[int] | None = None) -> None:
        """Prompts of the actor ended, `groups` the scored ones (prompts that failed are simply
        absent); `ended` is the version each ended prompt started under, failed ones included.
        None: every prompt the actor held ended."""
        if ended is None:
            self.lost(actor_id)
        else:
            held = self.generating.get(actor_id, Counter())
            for version in ended:
                assert held[version] >= self.samples_per_prompt, f"actor {actor_id} held no prompt of v{version}"
                held[version] -= self.samples_per_prompt
                self.generating_samples -= self.samples_per_prompt
            self.generating[actor_id] = +held  # drops the versions none is left of
        for group in groups:
            self.queue.append(group)
            self.queued_samples += len(group)

    def lost(self, actor_id: int) -> None:
        """Every prompt the actor held is gone (it died or was removed) or has ended."""
        self.generating_samples -= sum(self.generating.pop(actor_id, Counter()).values())

    # ----------------------------------------------------------------- learner

    def next_batch(self) -> tuple[list[PromptGroup] | None, list[PromptGroup]]:
        """(the batch to train now or None, the groups dropped as too stale).

        Oldest records first, so a late group is trained before fresher ones overtake it.
        A dropped group's prompt must be handed out again by the caller."""
        if self.training is not None:
            return None, []
        self.queue.sort(key=lambda g: g.policy_version)  # stable: arrival order within a version
        dropped = [g for g in self.queue if self.version - g.policy_version > self.max_staleness]
        self.queue = [g for g in self.queue if self.version - g.policy_version <= self.max_staleness]
        self.queued_samples -= sum(len(g) for g in dropped)
        if self.queued_samples < self.batch_size or self.waits_for_a_straggler():
            return None, dropped
        batch, n = [], 0
        while n < self.batch_size:
            group = self.queue.pop(0)
            batch.append(group)
            n += len(group)
        self.training, self.training_samples = batch, n
        self.queued_samples -= n
        return batch, dropped

    def waits_for_a_straggler(self) -> bool:
        """Whether a prompt in flight would be left too stale by an update that started without
        it: its samples could then be trained from version V + 1 at the earliest. Prompts that
        end out of order (long-tailed responses, slower actors) make such stragglers; the
        learner waits for one, and trains its samples first, rather than drop them."""
        oldest = min((v for held in self.generating.values() for v in held), default=None)
        return oldest is not None and self.version + 1 - oldest > self.max_staleness

    def update_done(self, trained: bool) -> list[PromptGroup]:
        """The update in flight ended; `trained` is false when it was skipped (its prompts must
        be handed out again by the caller). Returns its batch."""
        batch, self.training, self.training_samples = self.training or [], None, 0
        if trained:
            self.version += 1
        return batch

    def in_flight_prompts(self) -> list[str]:
        """Prompts queued or in training (generating ones are the actors' own to report)."""
        groups = list(self.training or []) + self.queue
        return [g.prompt_id for g in groups]
