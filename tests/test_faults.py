"""Fault injection on a real run: rollout actor processes and the reward replica killed with
SIGKILL, and rewards that overflow the learner, in the middle of training. The run must
carry on through each, with every prompt trained on exactly once. The test stops it once it
has survived them all: a fixed number of updates would race the faults on a fast machine.
The actors compute the reference log-probs (`rollout.reference_logprobs`), so their scoring
calls run in a second thread through every fault."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.runs import SMALL_BATCHES, Run, assert_each_prompt_once, few_prompts, ledger, smoke, trained_by

TOTAL = 10_000  # never reached: the test stops the run


def test_killed_actors_and_replica_and_nan_updates_lose_no_prompt(tiny_assets, ray_local, tmp_path):
    import ray

    poison = Path(os.environ["TAME_TEST_POISON"])
    poison.unlink(missing_ok=True)
    run = Run(
        smoke(
            tiny_assets,
            tmp_path,
            "run.name=faults",
            "train.max_staleness=1",
            f"train.total_updates={TOTAL}",
            *SMALL_BATCHES,
            "learner.max_nonfinite_updates=1000",
            "learner.checkpoint_every=1000",
            "reward.functions=[{function: 'tests.faults:gold_unless_poisoned', weight: 1.0}]",
            # Short enough that scoring calls give up while the killed replica is down.
            "reward.timeout_s=3",
            "rollout.reference_logprobs=true",
            prompts=few_prompts(tiny_assets, tmp_path),
        )
    )

    def reward_replicas():
        return [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "tame-reward" in a["name"] and "REPLICA" in a["name"]
        ]

    try:
        # 1. Kill the only rollout actor's process, twice, each time once it has trained. A
        #    replacement starts, loads the current weights, and takes over the dead one's prompts.
        for victim in (0, 1):
            status = run.wait_for(
                f"actor {victim} training",
                lambda s, e, victim=victim: trained_by(victim, e) and "pid" in s["actors"].get(victim, {}),
            )
            os.kill(status["actors"][victim]["pid"], signal.SIGKILL)
        run.wait_for("actor 2 training", lambda s, e: trained_by(2, e))

        # 2. Overflowing rewards: updates are skipped and the actors keep the weights they hold.
        poison.touch()
        try:
            status = run.wait_for("2 skipped updates", lambda s, e: s["counters"]["skipped_updates"] >= 2)
            held = status["policy_version"]
            status = run.wait_for("4 skipped updates", lambda s, e: s["counters"]["skipped_updates"] >= 4)
            assert status["policy_version"] == held, "a version was published from a NaN update"
            assert {a["version"] for a in status["actors"].values()} <= {held}
        finally:
            poison.unlink()

        # 3. Kill the reward service's replica. Scoring calls fail until Serve has started
        #    another; their prompts are handed out again, never scored as 0.
        run.wait_for("an update after the poison", lambda s, e: len(e) > held)
        killed = reward_replicas()
        assert len(killed) == 1, killed
        replica = ray.get_actor(killed[0], namespace="serve")
        os.kill(ray.get(replica.__ray_call__.remote(lambda _self: os.getpid())), signal.SIGKILL)
        run.wait_for("a new replica", lambda s, e: reward_replicas() not in ([], killed), limit=120)
        # More updates than the queue holds batches scored before the kill (1 + max_staleness).
        replaced_at = len(ledger(run.cfg.run_dir))
        run.wait_for("3 updates scored by the new replica", lambda s, e: len(e) >= replaced_at + 3)
    finally:
        run.stop()

    run.join(timeout=400)
    assert not run.is_alive() and run.error is None, (run.error, run.logs[-10:])
    summary, entries = run.summary, ledger(run.cfg.run_dir)
    assert summary["error"] is None and replaced_at + 3 <= summary["steps"] < TOTAL  # stopped, not failed
    assert [e["version"] for e in entries] == list(range(1, summary["steps"] + 1))
    assert summary["actor_failures"] == 2 and summary["skipped_updates"] >= 4 and summary["failed_prompts"] > 0
    assert {a for e in entries for a in e["actors"]} == {0, 1, 2}
    assert all(e["version"] - 1 - v <= 1 for e in entries for v in e["record_versions"])
    assert_each_prompt_once(entries, summary, 24)
    # The learner held no reference (a batch without the actors' log-probs would have raised);
    # the actors report their pass.
    rows = [json.loads(line) for line in (run.cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("perf/reference_seconds_per_sample", 0.0) > 0 for r in rows)


def test_a_corrupted_load_in_flight_retires_the_actor_and_every_prompt_is_trained_once(
    tiny_assets, ray_local, tmp_path, monkeypatch
):
    """Continuous generation with in-flight updates: the actor loads each new version while
    its prompts run on. The first such load is sent with probes that do not match its weights
    (a corrupted transfer, as the engine sees it): the actor is retired at once, a replacement
    loads the version, and the prompts the retired actor held are generated again, each trained
    exactly once. Responses that outlived a load span two versions and are trained within the
    staleness bound counted from their oldest token."""
    import dataclasses

    from cluster.controller import Loop
    from cluster.shared.transport import ObjectStoreTransport

    corrupted = []  # (actor, version, the prompts it held)
    launch = Loop.launch_generation

    def launch_with_one_bad_handle(self):
        held = [s for s in self.pool.slots.values() if s.pending is None and s.prompt_ids and s.version < self.version]
        if corrupted or not held:
            return launch(self)
        good = self.weights
        probes = ObjectStoreTransport.probes(good)
        self.weights = dataclasses.replace(good, probes={name: p + 1.0 for name, p in probes.items()})
        corrupted.append((held[0].actor_id, good.version, list(held[0].prompt_ids)))
        try:
            launch(self)
        finally:
            self.weights = good

    monkeypatch.setattr(Loop, "launch_generation", launch_with_one_bad_handle)
    run = Run(
        smoke(
            tiny_assets,
            tmp_path,
            "run.name=corrupted-in-flight",
            "train.max_staleness=1",
            "train.total_updates=6",
            *SMALL_BATCHES,
            "rollout.sampling.max_new_tokens=96",  # responses that outlive an update
            prompts=few_prompts(tiny_assets, tmp_path),
        )
    )
    run.join(timeout=400)
    assert run.error is None, (run.error, run.logs[-10:])
    assert corrupted, "no load was made with prompts in flight"
    (actor, version, held) = corrupted[0]
    summary, entries = run.summary, ledger(run.cfg.run_dir)
    assert summary["steps"] == 6 and summary["fingerprint_mismatches"] == 1
    assert any(f"actor {actor} removed: weight sync to version {version} not verified" in line for line in run.logs)
    assert {a for e in entries for a in e["actors"]} == {actor, actor + 1}
    assert_each_prompt_once(entries, summary, 24)
    trained = [p for e in entries for p in e["prompts"]]
    assert all(trained.count(p) <= 1 for p in held) and any(p in trained for p in held)
    # Staleness from the version a response started under, its oldest token's.
    assert all(e["version"] - 1 - v <= 1 for e in entries for v in e["record_versions"])
    rows = [json.loads(line) for line in (run.cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["rollout/spanning_share"] > 0 and r["rollout/versions_per_sample"] > 1 for r in rows)
    assert all(r["rollout/staleness_max"] <= 1 and r["rollout/dropped_stale"] == 0 for r in rows)
