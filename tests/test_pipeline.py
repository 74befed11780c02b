"""The admission rule of `cluster.pipeline` on a simulated clock: actors that generate and load
weights, a learner that trains, each taking a fixed time, driven as the controller drives
them. No Ray: what is tested is the scheduling rule itself."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from cluster.pipeline import Pipeline, PromptGroup


@dataclass
class Trace:
    staleness: list[int] = field(default_factory=list)  # of every trained group
    dropped: int = 0
    updates: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each update
    batches: list[list[str]] = field(default_factory=list)  # the prompt of every sample of each update
    actor_idle: float = 0.0  # actor-seconds neither generating nor loading, after the first update
    actor_time: float = 0.0


def simulate(
    k: int,
    generate_s: list[float],
    update_s: float,
    load_s: float = 0.05,
    updates: int = 40,
    batch: int = 32,
    per_prompt: int = 1,
    prompts_per_call: int = 32,
    lose_every: int = 0,
    max_waiting: int | None = None,
) -> Trace:
    """Run `updates` updates. Actor i takes generate_s[i] per call (whatever its size), a weight
    load takes load_s, an update update_s. With lose_every = n, every n-th call loses one
    prompt (a scoring failure): it is not trained and never comes back into the pipeline."""
    pipeline = Pipeline(batch, k, per_prompt, prompts_per_call, max_waiting=max_waiting or 10 * batch)
    trace = Trace()
    now, events, seq = 0.0, [], 0
    actors = [{"version": 0, "state": "idle", "idle_since": 0.0} for _ in generate_s]
    learner_busy, calls = False, 0
    prompt_ids = iter(range(10**9))

    def at(time, kind, *args):
        nonlocal seq
        heapq.heappush(events, (time, seq, kind, args))
        seq += 1

    def busy(i):
        a = actors[i]
        if trace.updates:
            trace.actor_idle += now - max(a["idle_since"], trace.updates[0][1])
        a["state"] = "busy"

    while len(trace.updates) < updates:
        # The controller's pass: actors first (load newer weights, else start what is admitted),
        # then the learner.
        for i, a in enumerate(actors):
            if a["state"] != "idle":
                continue
            if a["version"] < pipeline.version:
                busy(i)
                at(now + load_s, "loaded", i, pipeline.version)
            elif n := pipeline.prompts_to_start(a["version"]):
                busy(i)
                pipeline.started(i, n, a["version"])
                calls += 1
                lost = 1 if lose_every and calls % lose_every == 0 else 0
                at(now + generate_s[i], "generated", i, a["version"], n - lost)
        learner_busy = learner_busy or start_update(pipeline, trace, now, update_s, at)
        now, _, kind, args = heapq.heappop(events)
        if kind == "updated":
            pipeline.update_done(trained=True)
            learner_busy = False
        else:
            i = args[0]
            if kind == "loaded":
                actors[i]["version"] = args[1]
            else:
                version, n = args[1], args[2]
                pipeline.finished(
                    i, [PromptGroup(str(next(prompt_ids)), version, [None] * per_prompt) for _ in range(n)]
                )
            actors[i].update(state="idle", idle_since=now)
    trace.actor_time = len(actors) * (now - trace.updates[0][1])
    return trace


def start_update(pipeline: Pipeline, trace: Trace, now: float, update_s: float, at) -> bool:
    """The controller's learner step: train the next batch if one is ready (dropping what is
    too stale), recording it in `trace`; whether an update started."""
    batch, dropped = pipeline.next_batch()
    trace.dropped += sum(len(g) for g in dropped)
    if batch is None:
        return False
    trace.staleness += [pipeline.version - g.policy_version for g in batch]
    trace.batches.append([g.prompt_id for g in batch for _ in g.rollouts])
    trace.updates.append((now, now + update_s))
    at(now + update_s, "updated")
    return True


def learner_idle_share(trace: Trace) -> float:
    """Share of the time after the first update that the learner had nothing to train."""
    ups = trace.updates
    gaps = sum(b[0] - a[1] for a, b in zip(ups, ups[1:]))
    return gaps / (ups[-1][1] - ups[0][1])


@pytest.mark.parametrize("k", [0, 1, 2, 4])
@pytest.mark.parametrize(
    "generate_s, update_s", [([0.9], 2.0), ([2.0], 0.9), ([1.0, 1.0], 2.0), ([0.7, 0.7, 0.7], 0.5)]
)
def test_no_sample_is_generated_too_stale_to_train(k, generate_s, update_s):
    trace = simulate(k, generate_s, update_s, prompts_per_call=32 // len(generate_s))
    assert max(trace.staleness) <= k
    assert trace.dropped == 0
    if k == 0:
        assert set(trace.staleness) == {0}  # synchronous PPO: every record by the newest weights


@pytest.mark.parametrize("k", [1, 2])
def test_the_slower_role_never_waits(k):
    # Generation faster: the learner trains back to back (it waits only for the first batch).
    fast_actor = simulate(k, [0.9], update_s=2.0)
    assert learner_idle_share(fast_actor) == 0.0
    # Generation slower: the actors never wait for admission; they stop only to load weights.
    slow_actor = simulate(k, [2.0], update_s=0.9, load_s=0.0)
    assert slow_actor.actor_idle == 0.0
    assert max(slow_actor.staleness) <= k


def test_synchronous_ppo_takes_turns():
    trace = simulate(0, [0.9], update_s=2.0, load_s=0.1)
    # Each update waits for a load and a generation: idle (0.1 + 0.9) of every 3 seconds.
    assert learner_idle_share(trace) == pytest.approx(1.0 / 3.0)


def test_lost_prompts_do_not_stall_or_overfill_the_pipeline():
    # Every third call loses a prompt (its score failed): fewer samples arrive than were
    # admitted, and the freed room is filled by later calls, never beyond the bound.
    for k in (0, 1):
        trace = simulate(k, [0.5, 0.6], update_s=1.0, prompts_per_call=8, lose_every=3)
        assert max(trace.staleness) <= k and len(trace.updates) == 40


@pytest.mark.parametrize("k", [0, 1])
def test_a_queue_bound_below_one_batch_still_fills_a_batch(k):
    # train.queue_size x rollout.prompts_per_batch (4 x 8 = 32) below rollout_batch_size (64):
    # the bound is raised to one batch, or the learner would wait for ever.
    trace = simulate(k, [0.5], update_s=1.0, batch=64, prompts_per_call=8, max_waiting=32)
    assert len(trace.updates) == 40 and max(trace.staleness) <= k and trace.dropped == 0


def simulate_continuous(
    k: int, actors: int, update_s: float, capacity: int = 8, load_s: float = 0.02, updates: int = 30, seed: int = 0
) -> tuple[Trace, Counter, int]:
    """Continuous actors on a simulated clock: each holds up to `capacity` prompts, each
    prompt running its own long-tailed time (log-uniform 0.02-2 s: most short, a few 100x
    longer). An actor starts prompts as they end, as far as the rule admits, and loads a newer
    version between two of its steps while its prompts run on (in-flight updates), as the
    controller drives `RolloutActor.collect`. Returns the trace, how often each prompt was
    trained (in samples), and how many prompts were in flight across a load."""
    rng = random.Random(seed)
    pipeline = Pipeline(32, k, 4, capacity, max_waiting=10**6)
    trace, spanning = Trace(), 0
    now, events, seq, ids = 0.0, [], 0, iter(range(10**9))
    held = [dict() for _ in range(actors)]  # prompt id -> the version it started under
    version, loading, learner_busy = [0] * actors, [False] * actors, False

    def at(time, kind, *args):
        nonlocal seq
        heapq.heappush(events, (time, seq, kind, args))
        seq += 1

    while len(trace.updates) < updates:
        for i in range(actors):
            if loading[i]:
                continue
            if version[i] < pipeline.version:
                loading[i] = True
                spanning += len(held[i])
                at(now + load_s, "loaded", i, pipeline.version)
            elif n := pipeline.prompts_to_start(version[i], held=len(held[i])):
                pipeline.started(i, n, version[i])
                for _ in range(n):
                    prompt = str(next(ids))
                    held[i][prompt] = version[i]
                    at(now + math.exp(rng.uniform(math.log(0.02), math.log(2.0))), "ended", i, prompt)
        learner_busy = learner_busy or start_update(pipeline, trace, now, update_s, at)
        now, _, kind, args = heapq.heappop(events)
        if kind == "updated":
            pipeline.update_done(trained=True)
            learner_busy = False
        elif kind == "loaded":
            version[args[0]], loading[args[0]] = args[1], False
        else:
            i, prompt = args
            started = held[i].pop(prompt)
            pipeline.finished(i, [PromptGroup(prompt, started, [None] * 4)], [started])
    return trace, Counter(p for batch in trace.batches for p in batch), spanning


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("actors, update_s", [(1, 0.5), (1, 3.0), (3, 0.5), (3, 2.0)])
def test_continuous_actors_never_start_a_sample_too_stale_to_train(k, actors, update_s):
    """Prompts that end out of order and loads in flight: every sample is trained within k
    versions of the weights it started under, none is dropped, each prompt once."""
    trace, trained, spanning = simulate_continuous(k, actors, update_s)
    assert max(trace.staleness) <= k and trace.dropped == 0
    assert set(trained.values()) == {4}  # each prompt's 4 samples, once
    if k == 0:
        assert set(trace.staleness) == {0} and spanning == 0  # synchronous: no load meets a prompt
    elif update_s < 3.0:  # generation is the slower side: new weights reach prompts in flight
        assert spanning > 0, "no load happened with prompts in flight"


def test_whole_prompts_are_admitted():
    pipeline = Pipeline(batch_size=8, max_staleness=0, samples_per_prompt=4, max_prompts_per_call=16, max_waiting=64)
    assert pipeline.prompts_to_start(0) == 2  # 8 samples: two prompts of four
    pipeline.started(0, 1, 0)
    assert pipeline.prompts_to_start(0) == 1
    pipeline.started(1, 1, 0)
    assert pipeline.prompts_to_start(0) == 0  # the batch is spoken for
    # An actor holding an older version may start nothing that would be trained too stale.
    pipeline.version = 3
    assert pipeline.prompts_to_start(2) == 0


@pytest.mark.parametrize("k", [0, 1])
def test_the_samples_of_a_prompt_are_trained_together(k):
    """GRPO and RLOO compare the samples of one prompt: each prompt's 4 samples go into one
    update, never split across two, also when prompts are lost on the way."""
    trace = simulate(k, [0.5, 0.6], update_s=1.0, batch=32, per_prompt=4, prompts_per_call=3, lose_every=3)
    assert len(trace.updates) == 40 and max(trace.staleness) <= k
    seen = set()
    for batch in trace.batches:
        assert len(batch) == 32
        counts = {p: batch.count(p) for p in batch}
        assert set(counts.values()) == {4}, counts
        assert not seen & counts.keys(), "a prompt's samples were split across updates"
        seen |= counts.keys()


def test_only_an_actor_that_is_up_can_be_overdue_with_a_load():
    """An actor's first load waits for its engine to be built (maybe for Ray to place it):
    that is a pending start, never a hung load. A reload past rollout.load_timeout_s is."""
    from cluster.pool import ActorPool, Slot, SlotState

    pool = ActorPool(make_actor=None, target=4)
    new = Slot(0, None, SlotState.LOADING, version=-1, pending="ref0", loading=True, call_started=0.0)
    hung = Slot(1, None, SlotState.LOADING, version=4, pending="ref1", loading=True, call_started=0.0)
    generating = Slot(2, None, SlotState.GENERATING, version=5, pending="ref2", call_started=0.0)
    recent = Slot(3, None, SlotState.LOADING, version=4, pending="ref3", loading=True, call_started=9.5)
    # Scaled away while it loaded, holding prompts: its load has a deadline too, or a hung one
    # would keep its prompts in flight, and the learner waiting for them, for ever.
    leaving = Slot(4, None, SlotState.DRAINING, 4, pending="ref4", loading=True, prompt_ids=["0:1"], call_started=0.0)
    pool.slots = {s.actor_id: s for s in (new, hung, generating, recent, leaving)}
    assert pool.overdue_loads(now=10.0, timeout_s=5.0) == [hung, leaving]
    assert pool.overdue_loads(now=15.0, timeout_s=5.0) == [hung, recent, leaving]
    assert pool.pending_start() == [new]


def test_a_generation_call_past_its_deadline_is_overdue_draining_or_not():
    from cluster.pool import ActorPool, Slot, SlotState

    pool = ActorPool(make_actor=None, target=3)
    late = Slot(0, None, SlotState.GENERATING, version=3, pending="ref0", prompt_ids=["0:1"], call_started=0.0)
    leaving = Slot(1, None, SlotState.DRAINING, version=3, pending="ref1", prompt_ids=["0:2"], call_started=0.0)
    # Loading newer weights while it holds prompts: the load's own deadline applies.
    loading = Slot(2, None, SlotState.DRAINING, 3, pending="ref2", loading=True, prompt_ids=["0:4"], call_started=0.0)
    fresh = Slot(3, None, SlotState.GENERATING, version=3, pending="ref3", prompt_ids=["0:3"], call_started=8.0)
    pool.slots = {s.actor_id: s for s in (late, leaving, loading, fresh)}
    assert pool.overdue_generations(now=10.0, timeout_s=5.0) == [late, leaving]
    assert pool.overdue_generations(now=20.0, timeout_s=5.0) == [late, leaving, fresh]


def test_scaling_in_removes_idle_actors_and_those_not_up_yet_at_once_and_busy_ones_after_their_call():
    from cluster.pool import ActorPool, Slot, SlotState

    pool = ActorPool(make_actor=None, target=4)
    busy = Slot(0, None, SlotState.GENERATING, version=3, pending="ref0", prompt_ids=["0:1"])
    idle = Slot(1, None, SlotState.IDLE, version=3)
    unplaced = Slot(2, None, SlotState.LOADING, version=-1, pending="ref2")  # Ray found no room for it yet
    pool.slots = {s.actor_id: s for s in (busy, idle, unplaced)}
    assert pool.drain(2) == [unplaced, idle]  # the newest first
    assert pool.drain(1) == []  # the live one left is busy: it leaves after its call
    assert busy.state is SlotState.DRAINING and pool.live() == []


def test_scoring_failures_end_the_run_after_their_calls_time_counting_calls_that_ended_nothing():
    """reward.failing_timeout_s counts the time of calls that came back with nothing scored;
    once one has, the calls in which no prompt ended (the engine stepping long responses)
    count too, or a reward service that stays down would be waited on for many times the
    limit. A scored call resets the count; calls that end nothing before any failure do not
    start it."""
    from cluster.shared.errors import RunError
    from cluster.shared.records import RolloutBatch
    from cluster.state import ScoringWatch

    def call(ended: int, scored: bool) -> RolloutBatch:
        ids = [f"0:{i}" for i in range(ended)]
        rollouts = [object()] * ended if scored else []
        return RolloutBatch(0, 0, rollouts, ids, failed_prompt_ids=[] if scored else ids, score_error="down")

    watch = ScoringWatch(limit_s=1.0)
    watch.after_call(call(0, False), 5.0)  # nothing ended, nothing failed yet
    assert watch.failing_s == 0.0
    watch.after_call(call(2, False), 0.3)
    watch.after_call(call(0, False), 0.3)
    assert watch.failing_s == pytest.approx(0.6)
    watch.after_call(call(1, True), 0.3)
    assert watch.failing_s == 0.0
    watch.after_call(call(2, False), 0.6)
    with pytest.raises(RunError, match=r"for 1 s of calls .*the last failure: down"):
        watch.after_call(call(0, False), 0.5)
