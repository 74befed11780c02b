"""The elastic rollout pool (`rollout.autoscale`): how many actors the run asks for, as
bookkeeping. No Ray and no clock: the loop reports what each update's interval cost
(`Interval`), the rule answers with a size (`Decision`). `benchmarks/simulate.py` drives the
same object on a simulated clock with hundreds of actors.

The rule. Over a window of updates it measures what a batch costs each side:

    c = the actors' busy time, in actor-seconds (generating, scoring, loading weights)
    U = the learner's update time (publication included)

1. Predict. The period of an update with n actors is max(U, c / n) when the actors may
   generate the next batch while the learner trains (max_staleness >= 1), U + c / n when they
   may not (0). The predicted size is the fewest actors whose samples/s is within `slack` of
   what the most useful pool would give (max_actors, or fewer: as many calls as the admission
   rule lets run at once, `Pipeline.most_calls`). A pool below it grows to it at once, not an
   actor at a time: from 1 actor to 60 in one decision.
2. Try. The prediction sees averages; long-tailed responses and slower actors make a batch
   wait for its last call, which more actors can shorten (a free fast actor takes the next
   call). So while the learner still waits more than `wait` of the time, the pool grows by
   `step` and keeps the growth only if it paid: samples/s rose by at least `min_gain` of the
   actors' rise. A growth that did not pay is undone, and none is tried again until the work
   changes (`WORK_CHANGED`); one that paid is kept, and the pool does not shrink below it
   while the work stays what it was.
3. Shrink. When the learner waited no more than `wait` and fewer actors are predicted to do
   with `margin` more work than measured, the pool shrinks to that size.

Why it cannot oscillate on a steady load: it grows to the predicted size, where the same
prediction holds; it shrinks only to the size predicted for `margin` more work, so a grow and
a shrink are apart by the margin and noise below it moves neither; a try that did not pay is
undone once and not repeated while the work stays what it was; and after every change it
skips `cooldown` updates (new engines warm up, first loads) and measures a whole `window`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.shared.config import AutoscaleConfig

WORK_CHANGED = 0.25
"""A batch's cost (actor-seconds, update seconds) that moved by more than this share is a new
load: what was found enough before is tried again."""


@dataclass(frozen=True)
class Interval:
    """What one update's interval cost: from the previous update's end to this one's."""

    seconds: float
    samples: int
    """Trained by the update."""
    update_seconds: float
    """U: the learner's update, publication included."""
    busy_actor_seconds: float
    """c: the actors' time generating, scoring or loading (not waiting, not starting up)."""


@dataclass(frozen=True)
class Decision:
    """The pool size the rule asks for, and why (logged, and `rollout/autoscale_reason`)."""

    target: int
    reason: str
    changed: bool


class Autoscaler:
    """The rule's state: the window being measured and the size asked for."""

    def __init__(self, cfg: AutoscaleConfig, max_staleness: int, most_calls: int, actors: int):
        self.cfg = cfg
        self.overlap = max_staleness >= 1
        """Whether generation overlaps the update (max_staleness >= 1)."""
        self.useful = max(cfg.min_actors, min(cfg.max_actors, most_calls))
        """The most actors the prediction counts as useful: as many as calls may run at once."""
        self.target = actors
        self.window: list[Interval] = []
        self.skip = cfg.cooldown
        self.last: Decision | None = None
        self.trial: tuple[int, float] | None = None
        """(size, samples/s) before a growth beyond the prediction, until it is judged."""
        self.floor: tuple[int, tuple[float, float]] | None = None
        """(size, the work measured then) once a growth paid: no shrinking below it until the
        work changes."""
        self.enough: tuple[int, tuple[float, float]] | None = None
        """(size, the work measured then) once a growth did not pay: no further tries until the
        work changes by more than the margin."""

    def predicted_size(self, busy: float, update: float) -> int:
        """The fewest actors, within [min_actors, useful], predicted to give 1 - slack of the
        samples/s of `useful` actors, for a batch costing `busy` actor-seconds and `update`
        learner-seconds."""
        if busy <= 0:
            return self.cfg.min_actors
        best = max(update, busy / self.useful) if self.overlap else update + busy / self.useful
        allowed = best / (1.0 - self.cfg.slack)  # the longest period that is close enough
        room = allowed if self.overlap else allowed - update
        n = math.ceil(busy / room - 1e-9) if room > 0 else self.useful
        return min(self.useful, max(self.cfg.min_actors, n))

    def observe(self, interval: Interval, can_grow: bool = True) -> Decision | None:
        """Take one update's interval; a decision once a window is measured, else None.
        `can_grow` is false while actors asked for earlier still wait for room on the cluster."""
        if self.skip > 0:
            self.skip -= 1
            return None
        self.window.append(interval)
        if len(self.window) < self.cfg.window:
            return None
        window, self.window = self.window, []
        seconds = sum(i.seconds for i in window)
        rate = sum(i.samples for i in window) / seconds
        busy = sum(i.busy_actor_seconds for i in window) / len(window)
        update = sum(i.update_seconds for i in window) / len(window)
        load = (busy, update)
        waited = max(0.0, 1.0 - update * len(window) / seconds)
        idle = max(0.0, 1.0 - busy * len(window) / (seconds * self.target))
        seen = f"the learner waited {waited:.0%} and the actors {idle:.0%} of {len(window)} updates"
        n = self.target
        if self.enough is not None and not _close(load, self.enough[1], WORK_CHANGED):
            self.enough = None  # the work changed: what was enough may not be any more
        if self.floor is not None and not _close(load, self.floor[1], WORK_CHANGED):
            self.floor = None
        why = self._judge_try(rate, load, seen) if self.trial is not None else None
        if why is None:
            why = self._decide(busy, update, rate, waited, seen, can_grow)
        changed = self.target != n
        if changed:
            self.skip = self.cfg.cooldown
        self.last = Decision(self.target, why, changed)
        return self.last

    def _judge_try(self, rate: float, load: tuple[float, float], seen: str) -> str | None:
        """The last change grew beyond the prediction: keep it if it paid (then the pool does not
        shrink below it while the work is the same), else go back; the reason when it goes back."""
        (before, before_rate), n, self.trial = self.trial, self.target, None
        gain = (rate / before_rate - 1.0) / (n / before - 1.0)
        if gain >= self.cfg.min_gain:
            self.floor = (n, load)
            return None
        self.enough, self.target = (before, load), before
        gave = f"{n / before - 1:.0%} more actors gave {rate / before_rate - 1:+.0%} samples/s"
        return f"back {n} -> {before}: {gave} ({seen})"

    def _decide(self, busy: float, update: float, rate: float, waited: float, seen: str, can_grow: bool) -> str:
        """Grow to the prediction, try beyond it, shrink, or hold; sets the target, returns why."""
        n, cfg = self.target, self.cfg
        grow_to = self.predicted_size(busy, update)
        may_try = waited > cfg.wait and n < cfg.max_actors and self.enough is None
        if (grow_to > n or may_try) and not can_grow:
            return f"hold {n}: {seen}, but the actors asked for before still wait for room on the cluster"
        if grow_to > n:
            self.target = grow_to
            return f"grow {n} -> {grow_to}: {seen}; {grow_to} are predicted to keep it fed"
        if may_try:
            self.target, self.trial = min(cfg.max_actors, math.ceil(n * cfg.step)), (n, rate)
            return f"try {n} -> {self.target}: {seen}, more than predicted"
        shrink_to = max(self.predicted_size(busy * (1.0 + cfg.margin), update), self.floor[0] if self.floor else 0)
        if shrink_to < n and waited <= cfg.wait:
            self.target = shrink_to
            return f"shrink {n} -> {shrink_to}: {seen}; {shrink_to} are predicted to do"
        return f"hold {n}: {seen}" + (" (at max_actors)" if n == cfg.max_actors else "")

    def resized(self, actors: int) -> None:
        """The pool was resized from outside the rule (an actor that died and is not replaced):
        measure afresh from that size."""
        if actors != self.target:
            self.target, self.window, self.skip = actors, [], self.cfg.cooldown


def _close(a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    return all(abs(x - y) <= margin * max(abs(y), 1e-9) for x, y in zip(a, b))
