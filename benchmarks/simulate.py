"""The actor-learner loop on a simulated clock, at pool sizes this machine cannot hold.

The driver's decisions are tame's own: the admission rule and the batch order of
`cluster.pipeline.Pipeline`, and the pool size of `cluster.autoscale.Autoscaler`, fed the
same figures the loop measures. What is simulated is the world they decide over:
- an actor's call takes its prompts (`prompts_per_call` x `samples_per_prompt` samples) and
  decodes them together: overhead + step x (the longest response) + per-token x (all
  tokens), times the actor's own speed (slower and faster actors); response lengths are
  long-tailed (lognormal, cut at max_new_tokens);
- an update takes a fixed part plus a part per token of its batch, then the publication;
- each actor loads every version it generates from (a fixed time), and a new actor takes
  `start_s` to build its engine;
- a call fails now and then: its actor dies mid-call, its prompts go back, a new actor starts.

For each max_staleness (0, 1, 2) it runs fixed pools from 1 to 256 actors and the autoscaled
pool started from 1 actor, in two regimes (responses as drawn; twice as long), and one run
where the regime changes in the middle. Reported per run: samples/s against the ideal (the
slower side's rate), both idle shares, the staleness of trained samples, samples dropped as
stale, the pool size over time; and the driver's own time per event at 256 actors.

    .venv/bin/python benchmarks/simulate.py [--updates 80] [--seed 0]

Prints a table and, as its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.autoscale import Autoscaler, Interval  # noqa: E402
from cluster.pipeline import Pipeline, PromptGroup  # noqa: E402
from cluster.shared.config import AutoscaleConfig  # noqa: E402


@dataclass(frozen=True)
class World:
    batch: int = 512
    samples_per_prompt: int = 4
    prompts_per_call: int = 2
    max_new_tokens: int = 1024
    median_tokens: float = 120.0
    """Median response length; lengths are lognormal(median, sigma) cut at max_new_tokens."""
    sigma: float = 1.0
    prompt_tokens: int = 100
    call_overhead_s: float = 0.3
    """Per call: prefill, scoring, the round trip."""
    step_s: float = 0.025
    """One decoding step of an engine (memory-bound: nearly the same for 1 or 8 sequences)."""
    token_s: float = 0.0002
    """What each sequence adds to a step."""
    actor_speed_sigma: float = 0.2
    """Actors differ in speed: a factor lognormal(1, sigma) each."""
    load_s: float = 1.0
    start_s: float = 30.0
    update_s: float = 2.0
    update_token_s: float = 100e-6
    publish_s: float = 0.5
    failure_per_call: float = 0.002

    def lengths(self, rng: random.Random, n: int, scale: float) -> list[int]:
        mu = math.log(self.median_tokens * scale)
        return [max(1, min(self.max_new_tokens, int(rng.lognormvariate(mu, self.sigma)))) for _ in range(n)]


@dataclass
class Actor:
    id: int
    speed: float
    up: bool = False
    version: int = -1
    busy: bool = False
    draining: bool = False
    call: int = 0
    """Which call is in flight: an event of an older one (a dead actor's) is ignored."""
    prompts: list[str] = field(default_factory=list)
    idle_since: float | None = None
    up_since: float = 0.0


@dataclass
class Run:
    """One simulated run: the figures it reports."""

    times: list[float] = field(default_factory=list)
    """When each update ended."""
    sizes: list[int] = field(default_factory=list)
    learner_idle: list[float] = field(default_factory=list)
    actor_idle: list[float] = field(default_factory=list)
    staleness: list[tuple[int, int, int]] = field(default_factory=list)
    """(version trained from, staleness, samples) per trained group."""
    dropped: list[int] = field(default_factory=list)
    """Samples dropped as stale, by update."""
    decisions: list[tuple[int, str]] = field(default_factory=list)
    event_seconds: list[float] = field(default_factory=list)
    busy_rate: list[float] = field(default_factory=list)
    """Samples per busy actor-second, per update."""
    update_seconds: list[float] = field(default_factory=list)
    overlap: bool = True
    """Whether generation overlapped the update (max_staleness >= 1)."""


def simulate(
    world: World,
    max_staleness: int,
    updates: int,
    actors: int,
    autoscale: AutoscaleConfig | None,
    seed: int,
    regime_change_at: int | None = None,
    long_from_start: bool = False,
    time_events: bool = False,
) -> Run:
    rng = random.Random(seed)
    pipe = Pipeline(
        batch_size=world.batch,
        max_staleness=max_staleness,
        samples_per_prompt=world.samples_per_prompt,
        max_prompts_per_call=world.prompts_per_call,
        max_waiting=(max_staleness + 2) * world.batch,
    )
    scaler = Autoscaler(autoscale, max_staleness, pipe.most_calls(), actors) if autoscale else None
    events: list[tuple[float, int, str, int, object]] = []
    seq = 0
    now = 0.0
    pool: dict[int, Actor] = {}
    next_id = 0
    target = actors
    next_prompt = 0
    returned: list[str] = []
    learner_busy = False
    interval_start = update_started = 0.0
    idle_closed = busy_closed = 0.0  # actor-seconds within the interval
    run = Run(overlap=max_staleness >= 1)
    counts = {"dropped": 0}

    def push(at: float, kind: str, actor_id: int, payload: object = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, actor_id, payload))

    def scale() -> float:
        later = regime_change_at is not None and pipe.version >= regime_change_at
        return 2.0 if long_from_start or later else 1.0

    def start_actor() -> None:
        nonlocal next_id
        actor = Actor(next_id, rng.lognormvariate(0.0, world.actor_speed_sigma))
        pool[actor.id] = actor
        next_id += 1
        push(now + world.start_s * actor.speed, "up", actor.id)

    def go_busy(actor: Actor) -> None:
        nonlocal idle_closed
        if actor.idle_since is not None:
            idle_closed += now - max(actor.idle_since, interval_start)
            actor.idle_since = None
        actor.busy = True

    def go_idle(actor: Actor) -> None:
        actor.busy, actor.idle_since = False, now

    def leave(actor: Actor) -> None:
        nonlocal idle_closed, busy_closed
        go_busy(actor)  # closes its idle period
        if actor.up:
            busy_closed += now - max(actor.up_since, interval_start)
        returned.extend(actor.prompts)
        pipe.lost(actor.id)
        del pool[actor.id]

    def take(n: int) -> list[str]:
        nonlocal next_prompt
        out = []
        while returned and len(out) < n:
            out.append(returned.pop())
        while len(out) < n:
            out.append(f"p{next_prompt}")
            next_prompt += 1
        return out

    def drive() -> None:
        """The loop's turn: what `cluster.controller.Loop` decides after each event."""
        nonlocal learner_busy, update_started
        live = [a for a in pool.values() if not a.draining]
        for actor in live[target:] if len(live) > target else []:
            actor.draining = True
            if actor.up and not actor.busy or not actor.up:
                leave(actor)
        for _ in range(target - len(live)):
            start_actor()
        blocked = False
        for actor in list(pool.values()):
            if not actor.up or actor.busy or actor.draining:
                continue
            if actor.version < pipe.version:
                go_busy(actor)
                actor.call += 1
                push(now + world.load_s * actor.speed, "loaded", actor.id, (actor.call, pipe.version))
                continue
            if blocked:
                continue
            n = pipe.prompts_to_start(actor.version)
            if n == 0:
                blocked = True  # every actor holds this newest version: none may start
                continue
            go_busy(actor)
            actor.prompts = take(n)
            pipe.started(actor.id, n, actor.version)
            k = n * world.samples_per_prompt
            lengths = world.lengths(rng, k, scale())
            seconds = world.call_overhead_s + world.step_s * max(lengths) + world.token_s * sum(lengths)
            seconds *= actor.speed
            actor.call += 1
            if rng.random() < world.failure_per_call:
                push(now + rng.random() * seconds, "died", actor.id, actor.call)
            else:
                push(now + seconds, "generated", actor.id, (actor.call, actor.version, lengths))
        if not learner_busy:
            batch, dropped = pipe.next_batch()
            if dropped:
                counts["dropped"] += sum(len(g) for g in dropped)
                returned.extend(g.prompt_id for g in dropped)
            if batch is not None:
                learner_busy, update_started = True, now
                for g in batch:
                    run.staleness.append((pipe.version, pipe.version - g.policy_version, len(g)))
                tokens = sum(world.prompt_tokens + t for g in batch for t in g.rollouts)
                seconds = world.update_s + world.update_token_s * tokens + world.publish_s
                push(now + seconds, "updated", -1)

    def close_interval() -> Interval:
        nonlocal interval_start, idle_closed, busy_closed
        idle = idle_closed + sum(
            now - max(a.idle_since, interval_start) for a in pool.values() if a.idle_since is not None
        )
        up = busy_closed + sum(now - max(a.up_since, interval_start) for a in pool.values() if a.up)
        seconds = now - interval_start
        run.learner_idle.append(max(0.0, update_started - interval_start) / seconds)
        run.actor_idle.append(idle / up if up > 0 else 0.0)
        interval = Interval(seconds, world.batch, now - update_started, max(0.0, up - idle))
        interval_start, idle_closed, busy_closed = now, 0.0, 0.0
        return interval

    for _ in range(actors):
        start_actor()
    while pipe.version < updates:
        now, _, kind, actor_id, payload = heapq.heappop(events)
        actor = pool.get(actor_id)
        if kind == "updated":
            learner_busy = False
            batch = pipe.update_done(trained=True)
            interval = close_interval()
            run.times.append(now)
            run.sizes.append(sum(1 for a in pool.values() if not a.draining))
            run.update_seconds.append(interval.update_seconds)
            run.busy_rate.append(world.batch / max(interval.busy_actor_seconds, 1e-9))
            run.dropped.append(counts["dropped"])
            counts["dropped"] = 0
            if scaler is not None:
                decision = scaler.observe(interval, can_grow=True)
                if decision is not None:
                    run.decisions.append((pipe.version, decision.reason))
                    target = decision.target
            del batch
        elif actor is None:
            continue  # an event of an actor that left
        elif kind == "up":
            actor.up, actor.up_since = True, now
            go_idle(actor)
        elif kind == "died":
            if payload != actor.call:
                continue
            leave(actor)
            if not actor.draining:
                start_actor()
        elif payload[0] != actor.call:
            continue
        elif kind == "loaded":
            actor.version = payload[1]
            go_idle(actor)
            if actor.draining:
                leave(actor)
        elif kind == "generated":
            _, version, lengths = payload
            per = world.samples_per_prompt
            groups = [
                PromptGroup(p, version, lengths[i * per : (i + 1) * per])  # a "rollout" is its length here
                for i, p in enumerate(actor.prompts)
            ]
            actor.prompts = []
            pipe.finished(actor.id, groups)
            go_idle(actor)
            if actor.draining:
                leave(actor)
        started = time.perf_counter() if time_events else 0.0
        drive()
        if time_events:
            run.event_seconds.append(time.perf_counter() - started)
    return run


# --------------------------------------------------------------------------- reading runs


def rate(run: Run, first: int, last: int) -> float:
    """Samples/s from update `first`'s end (at least the first update's) to update `last`'s."""
    first = max(first, 1)
    return (last - first) * BATCH / (run.times[last - 1] - run.times[first - 1])


BATCH = World().batch


def ideal(learner: float, actors: float, overlap: bool) -> float:
    """The slower side's rate when generation overlaps the update (max_staleness >= 1); when the
    sides take turns (0), one batch costs both sides' times."""
    return min(learner, actors) if overlap else 1.0 / (1.0 / learner + 1.0 / actors)


def steady(run: Run, first: int, last: int | None = None) -> dict:
    last = len(run.times) if last is None else last
    sl = slice(first, last)
    hist: dict[int, int] = {}
    for version, s, n in run.staleness:
        if first <= version < last:
            hist[s] = hist.get(s, 0) + n
    samples = sum(hist.values())
    return {
        "samples_per_s": rate(run, first, last),
        "ideal_samples_per_s": ideal(
            BATCH / statistics.mean(run.update_seconds[sl]),
            statistics.mean(run.sizes[sl]) * statistics.median(run.busy_rate[sl]),
            run.overlap,
        ),
        "learner_idle_share": statistics.mean(run.learner_idle[sl]),
        "actor_idle_share": statistics.mean(run.actor_idle[sl]),
        "dropped": sum(run.dropped[sl]),
        "staleness": {s: n / samples for s, n in sorted(hist.items())},
        "actors_mean": statistics.mean(run.sizes[sl]),
    }


def reached(run: Run, goal: float, start: int = 0, span: int = 4) -> int | None:
    """The first update (counted from `start`) whose last `span` updates ran at >= goal."""
    for u in range(start + span, len(run.times)):
        if span * BATCH / (run.times[u] - run.times[u - span]) >= goal:
            return u - start
    return None


def sweep(world: World, k: int, updates: int, seed: int, long: bool) -> dict[int, dict]:
    """Fixed pools: coarse over 1-256, then every size up to the best coarse one."""
    out: dict[int, dict] = {}

    def one(n: int) -> None:
        if n not in out:
            run = simulate(world, k, updates, n, None, seed, long_from_start=long)
            out[n] = steady(run, updates // 4)

    for n in (1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256):
        one(n)
    best = max(out[n]["samples_per_s"] for n in out)
    knee = min(n for n in out if out[n]["samples_per_s"] >= 0.99 * best)
    for n in range(max(1, knee - 8), knee):
        one(n)
    return out


def best_fixed(fixed: dict[int, dict]) -> tuple[float, int, int]:
    """(the best samples/s, the size that gave it, the fewest actors within 1% of it)."""
    best_n = max(fixed, key=lambda n: fixed[n]["samples_per_s"])
    best = fixed[best_n]["samples_per_s"]
    return best, best_n, min(n for n, f in fixed.items() if f["samples_per_s"] >= 0.99 * best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    world, updates = World(), args.updates
    auto = AutoscaleConfig(min_actors=1, max_actors=256)
    results: dict = {"world": world.__dict__, "autoscale": auto.model_dump(), "updates": updates, "by_staleness": {}}
    print(
        f"{'k':>2} {'regime':>7} {'pool':>10} {'samples/s':>9} {'of ideal':>8} {'learner idle':>12} "
        f"{'actor idle':>10} {'dropped':>7}  stale 0/1/2"
    )
    for k in args.staleness:
        entry: dict = {}
        for regime, long in (("short", False), ("long", True)):
            fixed = sweep(world, k, updates, args.seed, long)
            best, best_n, fewest = best_fixed(fixed)
            run = simulate(world, k, updates, 1, auto, args.seed, long_from_start=long)
            reach = reached(run, 0.9 * best)
            after = run.sizes[reach:] if reach is not None else []
            auto_steady = steady(run, reach if reach is not None else updates // 2)
            entry[regime] = {
                "fixed": fixed,
                "best_fixed_samples_per_s": best,
                "best_fixed_actors": best_n,
                "fewest_actors_within_1pct": fewest,
                "autoscaled": {
                    **auto_steady,
                    "updates_to_0.9_of_best": reach,
                    "most_actors_after": max(after, default=None),
                    "sizes": run.sizes,
                    "decisions": run.decisions,
                },
            }
            for n in sorted(fixed):
                if n in (1, 8, 32, 64, 128, 256) or n in (best_n, fewest):
                    _row(k, regime, f"{n}" + (" best" if n == best_n else " 1%" if n == fewest else ""), fixed[n])
            _row(k, regime, "autoscaled", auto_steady)
            print(
                f"   autoscaled: 0.9x of best ({best:.1f}/s at {best_n}) after {reach} updates, "
                f"then at most {max(after, default=None)} actors"
            )
        # The regime changes halfway: responses twice as long from then on.
        half = updates // 2
        run = simulate(world, k, updates, 1, auto, args.seed, regime_change_at=half)
        best_long, best_long_n = entry["long"]["best_fixed_samples_per_s"], entry["long"]["best_fixed_actors"]
        fewest_long = entry["long"]["fewest_actors_within_1pct"]
        settle = reached(run, 0.9 * best_long, start=half)
        after = run.sizes[half + settle :] if settle is not None else []
        entry["regime_change"] = {
            "at_update": half,
            "updates_to_0.9_of_best_after": settle,
            "most_actors_after": max(after, default=None),
            "dropped_after_settling": sum(run.dropped[half + settle :]) if settle is not None else None,
            "last_change_after": max(
                (u - half for u, r in run.decisions if u > half and not r.startswith("hold")), default=0
            ),
            "sizes": run.sizes,
            "decisions": run.decisions,
        }
        print(
            f"   regime change at {half}: 0.9x of the long regime's best after {settle} updates, last change "
            f"after {entry['regime_change']['last_change_after']}, "
            f"then at most {max(after, default=None)} actors (best fixed {best_long_n}, within 1% from {fewest_long})"
        )
        results["by_staleness"][k] = entry
    # The driver's own time per event, at 256 actors (fixed) and in an autoscaled run.
    run = simulate(world, 1, 30, 256, None, args.seed, time_events=True)
    ev = sorted(run.event_seconds)
    results["driver_ms_per_event_256"] = {
        "events": len(ev),
        "mean": 1e3 * statistics.mean(ev),
        "p99": 1e3 * ev[int(0.99 * len(ev))],
        "max": 1e3 * ev[-1],
    }
    print(f"driver at 256 actors: {results['driver_ms_per_event_256']}")
    print(json.dumps(results, default=str))


def _row(k: int, regime: str, pool: str, f: dict) -> None:
    stale = "/".join(f"{f['staleness'].get(s, 0):.2f}" for s in range(3))
    print(
        f"{k:>2} {regime:>7} {pool:>10} {f['samples_per_s']:9.1f} {f['samples_per_s'] / f['ideal_samples_per_s']:8.2f} "
        f"{f['learner_idle_share']:12.2f} {f['actor_idle_share']:10.2f} {f['dropped']:7d}  {stale}"
    )


if __name__ == "__main__":
    main()
