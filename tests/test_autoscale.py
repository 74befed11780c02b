"""The autoscale rule of `cluster.autoscale` on a simulated load: a batch that costs the actors
`work` actor-seconds and the learner `update` seconds, whose period with n actors is
max(update, work / n, tail) (max_staleness >= 1). No Ray: what is tested is the rule."""

from __future__ import annotations

import random

import pytest

from cluster.autoscale import Autoscaler, Interval
from cluster.shared.config import AutoscaleConfig

BATCH = 512


def interval(n: int, work: float, update: float, tail: float = 0.0, noise: float = 0.0, rng=None) -> Interval:
    jitter = 1.0 + (rng.uniform(-noise, noise) if rng else 0.0)
    period = max(update, work * jitter / n, tail)
    return Interval(seconds=period, samples=BATCH, update_seconds=update, busy_actor_seconds=work * jitter)


def drive(scaler: Autoscaler, updates: int, **load) -> list[int]:
    """The pool size after each update."""
    sizes = []
    for _ in range(updates):
        scaler.observe(interval(scaler.target, **load))
        sizes.append(scaler.target)
    return sizes


def make(actors: int = 1, **cfg) -> Autoscaler:
    return Autoscaler(AutoscaleConfig(**{"max_actors": 64, **cfg}), max_staleness=1, most_calls=256, actors=actors)


def test_the_pool_grows_at_once_to_the_predicted_size_and_holds_it():
    scaler = make(window=2, cooldown=1)
    sizes = drive(scaler, 30, work=100.0, update=10.0)
    # c / U = 10 actors keep the learner fed; within 5% (slack): ceil(0.95 x 10) = 10.
    assert sizes[:3] == [1, 1, 10]  # one update skipped (cooldown), two measured, then one decision
    assert set(sizes[3:]) == {10}
    assert scaler.last.reason.startswith("hold 10: the learner waited 0% and the actors 0%")


@pytest.mark.parametrize("work, bound", [(1000.0, 6), (0.5, 3)])
def test_never_above_max_actors_nor_below_min_actors(work, bound):
    scaler = make(actors=3, min_actors=3, max_actors=6, cooldown=0, window=1)
    sizes = drive(scaler, 20, work=work, update=10.0)
    assert sizes[-1] == bound and all(3 <= n <= 6 for n in sizes)


def test_no_decision_inside_the_cooldown_nor_before_a_whole_window():
    scaler = make(window=3, cooldown=2)
    answers = [scaler.observe(interval(scaler.target, 100.0, 10.0)) for _ in range(5)]
    assert answers[:4] == [None] * 4 and answers[4].changed and answers[4].target == 10
    after = [scaler.observe(interval(scaler.target, 50.0, 10.0)) for _ in range(5)]
    assert after[:4] == [None] * 4  # the change restarts the cooldown, then a whole window
    assert after[4].reason.startswith("shrink 10 -> 6")  # ceil(0.95 x 5 x 1.1 margin) = 6


def test_a_steady_noisy_load_never_moves_the_pool_back_and_forth():
    rng = random.Random(0)
    scaler = make(window=2, cooldown=1)
    sizes = [drive(scaler, 1, work=300.0, update=10.0, noise=0.05, rng=rng)[0] for _ in range(300)]
    settled = sizes[10:]
    # Noise may lift the pool once to the top of its band (a grow is taken at once); it never
    # brings it back down: shrinking needs the margin (10%) more than the noise (5%).
    assert settled == sorted(settled) and len(set(settled)) <= 2, sorted(set(settled))
    assert 28 <= settled[-1] <= 30  # c / U = 30, within the slack


def test_a_growth_that_does_not_pay_is_undone_and_not_tried_again_until_the_work_changes():
    # The learner waits for a tail that more actors do not shorten: 10 actors predicted; the
    # try at 15 gains nothing, back to 10, and no further try while the work is the same.
    scaler = make(window=1, cooldown=0)
    reasons = []
    for _ in range(20):
        reasons.append(scaler.observe(interval(scaler.target, 100.0, 10.0, tail=20.0)).reason)
    sizes = [int(r.split(" -> ")[1].split(":")[0]) if " -> " in r else int(r.split()[1][:-1]) for r in reasons]
    assert reasons[2].startswith("back 15 -> 10: 50% more actors gave +0% samples/s"), reasons[2]
    assert sizes[:3] == [10, 15, 10] and set(sizes[3:]) == {10}
    # Twice the work: a new load, the pool grows to its prediction and tries again.
    sizes = drive(scaler, 5, work=200.0, update=10.0, tail=20.0)
    assert sizes[:2] == [19, 29], sizes


def test_a_growth_that_pays_is_kept():
    # The tail shrinks as the pool grows (more free actors take the slow calls): each try
    # pays, so the pool grows past the prediction until max_actors.
    scaler = make(window=1, cooldown=0, max_actors=20)
    for _ in range(10):
        n = scaler.target
        scaler.observe(interval(n, 100.0, 10.0, tail=300.0 / n))
    assert scaler.target == 20 and scaler.last.reason.startswith("hold 20")
