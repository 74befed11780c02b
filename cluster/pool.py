"""The rollout actor pool as the loop sees it: one slot per actor, its state, the call the
loop waits on, and how long the actors sat idle.

A slot's life: LOADING (weights) -> IDLE <-> GENERATING, or LOADING again for a newer version;
the state is that of the call in flight, and an actor's prompts stay in flight across calls
(`prompt_ids`), a load between two calls being a load between two engine steps. `tame scale`
down marks a slot DRAINING: an idle one leaves at once, one holding prompts goes on collecting
them and leaves once the last has come back, so nothing it was given is lost.
Which result a finished call holds is told by its type (`LoadResult` or `RolloutBatch`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class SlotState(Enum):
    LOADING = "loading"
    """Loading (and verifying) a policy version, its prompts (if any) waiting in its engine."""
    IDLE = "idle"
    """Holds a verified version and has nothing to do."""
    GENERATING = "generating"
    """Stepping its engine over its prompts (`prompt_ids`), scoring those that end."""
    DRAINING = "draining"
    """Scaled away: finishes the prompts it holds, then leaves."""


@dataclass
class Slot:
    """One rollout actor."""

    actor_id: int
    handle: Any
    state: SlotState = SlotState.LOADING
    version: int = -1
    """The policy version its engine holds, verified; -1 before its first load."""
    pending: Any = None
    """The ObjectRef of the call in flight (LOADING, GENERATING, DRAINING)."""
    loading: bool = False
    """The call in flight is a weight load."""
    prompt_ids: list[str] = field(default_factory=list)
    """The prompts in its engine, started and not ended: handed out again if it dies."""
    call_started: float = 0.0
    """When the call in flight started."""
    idle_since: float | None = None
    up_since: float | None = None
    """When its first load returned: from then on its time counts as busy or idle."""
    tokens: int = 0
    generate_seconds: float = 0.0


class ActorPool:
    """Starts, tracks and removes rollout actors; accounts their idle time per interval."""

    def __init__(self, make_actor: Callable[[int, Any], Any], target: int):
        self.make_actor = make_actor  # (actor_id, scorer) -> actor handle
        self.target = target
        """How many actors the run wants (`rollout.num_actors`, then `tame scale`)."""
        self.slots: dict[int, Slot] = {}
        self.next_actor_id = 0
        self.interval_start = time.monotonic()
        self.idle_closed = 0.0  # idle actor-seconds closed within the interval
        self.up_closed = 0.0  # up actor-seconds of actors removed within the interval

    def __len__(self) -> int:
        return len(self.slots)

    def create(self, scorer: Any) -> tuple[int, Any]:
        """A new actor process (it builds its engine at once); it joins with `add`."""
        actor_id = self.next_actor_id
        self.next_actor_id += 1
        return actor_id, self.make_actor(actor_id, scorer)

    def add(self, actor_id: int, handle: Any, weights: Any) -> Slot:
        """Put an actor in the pool; it loads `weights` (the newest version's handle) before
        anything else."""
        slot = Slot(
            actor_id, handle, pending=handle.load_weights.remote(weights), loading=True, call_started=time.monotonic()
        )
        self.slots[actor_id] = slot
        return slot

    def remove(self, slot: Slot) -> list[str]:
        """Kill an actor and take it out; returns the prompts it held."""
        import ray

        self.mark_busy(slot)
        if slot.up_since is not None:
            self.up_closed += time.monotonic() - max(slot.up_since, self.interval_start)
        self.slots.pop(slot.actor_id, None)
        ray.kill(slot.handle)
        prompts, slot.prompt_ids = slot.prompt_ids, []
        return prompts

    def live(self) -> list[Slot]:
        """The slots not on their way out."""
        return [s for s in self.slots.values() if s.state is not SlotState.DRAINING]

    def drain(self, count: int) -> list[Slot]:
        """Mark the `count` newest live actors to leave; returns those that can leave now
        (idle with no prompts, or not up yet: a first load may wait for Ray to place the actor
        for ever), the others leave once the prompts they hold have come back."""
        leaving = sorted(self.live(), key=lambda s: -s.actor_id)[: max(0, count)]
        idle = [s for s in leaving if (s.state is SlotState.IDLE and not s.prompt_ids) or s.version < 0]
        for slot in leaving:
            slot.state = SlotState.DRAINING
        return idle

    def waiting_on(self) -> dict[Any, Slot]:
        """{ObjectRef: slot} of every call in flight."""
        return {s.pending: s for s in self.slots.values() if s.pending is not None}

    def dispatch(self, slot: Slot, state: SlotState, call: Any) -> None:
        """Start a call on an actor (a load or a generation)."""
        slot.state, slot.pending, slot.call_started = state, call, time.monotonic()
        slot.loading = state is SlotState.LOADING
        self.mark_busy(slot)

    def pending_start(self) -> list[Slot]:
        """Actors not up yet: not placed by Ray, or building their engine (no version loaded)."""
        return [s for s in self.slots.values() if s.version < 0]

    def reloading(self) -> list[Slot]:
        """Actors that are up and loading a newer version, draining ones included. (An actor's
        first load waits for its engine to be built: `pending_start`.)"""
        return [s for s in self.slots.values() if s.pending is not None and s.loading and s.version >= 0]

    def generating(self) -> list[Slot]:
        """Actors with a generation call in flight (draining ones included)."""
        return [s for s in self.slots.values() if s.pending is not None and s.prompt_ids and not s.loading]

    def overdue_generations(self, now: float, timeout_s: float) -> list[Slot]:
        """Actors whose generation call started more than `timeout_s` ago."""
        return [s for s in self.generating() if now - s.call_started > timeout_s]

    def overdue_loads(self, now: float, timeout_s: float) -> list[Slot]:
        """Actors that are up and have not confirmed a load started more than `timeout_s` ago."""
        return [s for s in self.reloading() if now - s.call_started > timeout_s]

    def to_next_deadline(self, now: float, load_timeout_s: float, generate_timeout_s: float | None) -> float:
        """Seconds until a load or a generation call is overdue (1e9 when none can be)."""
        ahead = [s.call_started + load_timeout_s - now for s in self.reloading()]
        if generate_timeout_s is not None:
            ahead += [s.call_started + generate_timeout_s - now for s in self.generating()]
        return min(ahead, default=1e9)

    def returned(self, slot: Slot) -> bool:
        """A call of this slot finished: the slot goes idle. False when it is draining and
        must be removed instead."""
        slot.pending = None
        if slot.state is SlotState.DRAINING:
            return False
        slot.state, slot.idle_since = SlotState.IDLE, time.monotonic()
        return True

    def held_prompts(self) -> list[str]:
        """The prompts in the actors' engines."""
        return [p for s in self.slots.values() for p in s.prompt_ids]

    def tokens_per_s(self) -> dict[str, float]:
        """Each actor's generation speed over its calls so far, by W&B name."""
        return {
            f"rollout/actor_{s.actor_id}/tokens_per_s": s.tokens / s.generate_seconds
            for s in self.slots.values()
            if s.generate_seconds > 0
        }

    # ------------------------------------------------------------------ idle accounting

    def mark_busy(self, slot: Slot) -> None:
        """Close the slot's idle period, counting the part inside the current interval."""
        if slot.idle_since is not None:
            self.idle_closed += time.monotonic() - max(slot.idle_since, self.interval_start)
            slot.idle_since = None

    def mark_up(self, slot: Slot) -> None:
        """The actor's first load returned: it is up."""
        slot.up_since = time.monotonic()

    def close_interval(self, now: float) -> tuple[float, float]:
        """(the share of the interval, since the last call, the actors that were up sat idle;
        the actor-seconds they were busy: generating, scoring, loading). Starts the next
        interval. Actors not up yet (placed by Ray, building their engine) count in neither."""
        start = self.interval_start
        idle = self.idle_closed + sum(
            now - max(s.idle_since, start) for s in self.slots.values() if s.idle_since is not None
        )
        up = self.up_closed + sum(now - max(s.up_since, start) for s in self.slots.values() if s.up_since is not None)
        self.interval_start, self.idle_closed, self.up_closed = now, 0.0, 0.0
        return (idle / up if up > 0 else 0.0), max(0.0, up - idle)
