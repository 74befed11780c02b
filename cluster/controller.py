"""`tame train`: the actor-learner loop that wires the roles together on Ray.

The loop runs in the driver. It owns the prompt cursor and the experience pipeline
(`cluster.pipeline`); the rollout actors (vLLM), the reward service (Serve) and the learner
run as Ray actors. One pass of the loop: apply scale requests, hand prompts to idle actors
as far as the staleness bound admits, start a learner update when a batch is ready, then
wait for whichever of those finishes first.

Versions: the learner publishes version v into the object store with its probes (a
fingerprint, `cluster.shared.transport`); an actor loads it between generation batches and checks
its engine's own probes against them. An actor starts a batch only if every sample in it will be trained
within `max_staleness` versions of the weights that made it (`Pipeline.prompts_to_start`).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from cluster.metrics import Metrics
from cluster.pipeline import Group, Pipeline
from cluster.pool import ActorPool, Slot, SlotState
from cluster.prompts import PromptSource
from cluster.shared.config import TameConfig, check_model_folder, gpu_env
from cluster.shared.data import load_prompts
from cluster.shared.errors import ConfigError, RunError, UserError
from cluster.shared.files import write_json, write_text
from cluster.shared.ray_cluster import connect_ray, started_here, starts_local
from cluster.shared.records import LoadResult, Rollout, RolloutBatch, UpdateResult
from cluster.shared.resources import ask, check_cluster, check_local, free_on_cluster, roles
from cluster.shared.startup import Pending, ref_done, wait_until_up
from cluster.shared.tokens import require_chat_template
from cluster.shared.transport import WeightsHandle
from cluster.state import Counters, DriverState

NAMESPACE = "tame"
CONTROL_PREFIX = "tame-control-"
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def rollout_actor_class(cfg: TameConfig):
    """`RolloutActor` as a Ray actor class with the resources and environment of cfg.rollout."""
    import ray

    from actors.rollout import RolloutActor

    r = cfg.rollout
    return ray.remote(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=r.resources,
                      runtime_env={"env_vars": {**ENGINE_ENV, **gpu_env(r.num_gpus)}})(RolloutActor)


def learner_env(cfg: TameConfig) -> dict[str, str]:
    """The learner process's environment.

    A learner running more threads than it reserved while the actors generate beside it
    (max_staleness >= 1) lets its OpenMP threads sleep at barriers instead of spinning: it
    then borrows only the core time the actors leave idle (benchmarks/README.md); when the
    roles take turns (max_staleness 0), spinning is faster.

    A sharded learner on a CPU is there to save memory: its workers' glibc hands freed
    blocks of 256 KiB and more back to the system at once. Otherwise the heap keeps the
    buffers FSDP2 gathers and frees for every unit, and each worker ends up holding about
    what one unsharded learner does; the price is a page fault per fresh page, which makes
    an update slower (benchmarks/README.md)."""
    env = {}
    threads = cfg.learner.threads or cfg.learner.num_cpus
    if cfg.train.max_staleness >= 1 and threads > cfg.learner.num_cpus:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if cfg.learner.num_workers > 1 and cfg.learner.device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = str(256 * 1024)
    return env


def start_learner(cfg: TameConfig):
    """The learner actor, and its placement group (None for one worker). With
    learner.num_workers > 1 the actor is rank 0 of a sharded learner, in the first bundle of a
    placement group that holds every worker (packed onto as few nodes as fit); it starts the
    others in the remaining bundles (`learner/workers.py`)."""
    import ray

    lc = cfg.learner
    options = {"num_cpus": lc.num_cpus, "num_gpus": lc.num_gpus, "resources": lc.resources,
               "runtime_env": {"env_vars": {**learner_env(cfg), **gpu_env(lc.num_gpus)}}}
    if lc.num_workers == 1:
        from learner.learner import Learner

        return ray.remote(**options)(Learner).remote(cfg, str(cfg.run_dir)), None
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from learner.workers import LeadLearner

    bundle = {k: v for k, v in {"CPU": lc.num_cpus, "GPU": lc.num_gpus, **lc.resources}.items() if v > 0}
    group = placement_group([bundle] * lc.num_workers, strategy="PACK")
    placed = [{**options, "scheduling_strategy": PlacementGroupSchedulingStrategy(group, rank)}
              for rank in range(lc.num_workers)]
    return ray.remote(LeadLearner).options(**placed[0]).remote(cfg, str(cfg.run_dir), placed[1:]), group


# --------------------------------------------------------------------------- scaling mailbox


class Control:
    """A named actor through which `tame scale` reaches a running job."""

    def __init__(self, run: str, num_actors: int):
        self.run = run
        self.target = num_actors
        self.stopping = False
        self.status: dict = {"run": run, "num_actors": num_actors}

    def request(self, num_actors: int) -> dict:
        self.target = num_actors
        return {"run": self.run, "num_actors": num_actors}

    def stop(self) -> None:
        """Finish the run early, as if its last update were reached: checkpoint and summary."""
        self.stopping = True

    def poll(self) -> tuple[int, bool]:
        return self.target, self.stopping

    def report(self, status: dict) -> None:
        self.status = status

    def get_status(self) -> dict:
        return self.status


def scale(num_actors: int, run: str | None = None, address: str | None = None) -> dict:
    """Ask the running job `run` (the only one when None) for `num_actors` rollout actors."""
    import ray

    # "auto": the running cluster of this machine; `tame scale` never starts one.
    given = address or os.environ.get("RAY_ADDRESS")
    try:
        connect_ray(given or "auto", namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    except ConnectionError:
        where = f"at {given}" if given else "on this machine (give one with --address or RAY_ADDRESS)"
        raise UserError(f"--address: no running Ray cluster {where} to scale a job on") from None
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and a["name"].startswith(CONTROL_PREFIX)]
    runs = [n.removeprefix(CONTROL_PREFIX) for n in names]
    if run is None:
        if len(runs) != 1:
            raise UserError(f"--run: {len(runs)} tame runs are running ({', '.join(runs) or 'none'}): name one")
        run = runs[0]
    if run not in runs:
        raise UserError(f"--run {run}: no such running tame job (running: {', '.join(runs) or 'none'})")
    control = ray.get_actor(CONTROL_PREFIX + run, namespace=NAMESPACE)
    answer = ray.get(control.request.remote(num_actors))
    # The loop applies the request within a second and reports the actors not up yet.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        status = ray.get(control.get_status.remote())
        if status.get("num_actors") == num_actors and "pending" in status:
            return {**answer, "live_actors": status["live_actors"], "pending": status["pending"]}
        time.sleep(0.25)
    return answer


# --------------------------------------------------------------------------- the loop


def _no_generation() -> dict[str, float]:
    """The generation counters of one logging interval, at zero."""
    return {"samples": 0, "generate_seconds": 0.0, "score_seconds": 0.0, "reference_seconds": 0.0}


class Loop:
    def __init__(self, cfg: TameConfig, resume: bool, log: Callable[[str], None],
                 judge: Callable[[list[Rollout]], dict] | None = None, stop: StopSignal | None = None,
                 created: float | None = None):
        import ray

        from reward_service.client import RewardClient
        from reward_service.service import coming_up, deploy

        self.cfg, self.log, self.judge = cfg, log, judge
        self.run_dir = cfg.run_dir
        self.k = cfg.train.max_staleness
        self.source = PromptSource(load_prompts(cfg.data.prompts), cfg.run.seed, cfg.data.shuffle)
        per_prompt = cfg.rollout.sampling.samples_per_prompt
        self.pipeline = Pipeline(
            batch_size=cfg.train.rollout_batch_size, max_staleness=self.k, samples_per_prompt=per_prompt,
            max_prompts_per_call=cfg.rollout.prompts_per_batch,
            max_waiting=cfg.train.queue_size * cfg.rollout.prompts_per_batch * per_prompt)
        self.counters = Counters()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

        # The slow starts overlap: the learner's and the first actors' processes import torch
        # and build their models while Serve deploys the reward service.
        actor_cls = rollout_actor_class(cfg)
        self.pool = ActorPool(lambda actor_id, scorer: actor_cls.remote(cfg, actor_id, scorer), cfg.rollout.num_actors)
        log(f"starting the learner and {self.pool.target} rollout actor(s)")
        self.learner, self.learner_group = start_learner(cfg)
        early: list = []
        self.control, self.metrics = None, None
        try:
            early.extend(self.pool.create(scorer=None) for _ in range(self.pool.target))

            # A Serve instance this run starts is stopped with it, so a later deployment on the
            # same cluster starts Serve afresh with its own HTTP options.
            self.owns_serve = not _serve_running()
            log(f"starting the reward service ({cfg.reward.replicas} replica(s))")
            self.scorer = RewardClient(deploy(cfg, http=False, name=reward_app(cfg), wait=False),
                                       cfg.reward.timeout_s, cfg.reward.retries, cfg.reward.call_items_per_s)
            learner_role, rollout_role = roles(cfg, only=("learner", "rollout"))
            roles_up = [
                Pending("the learner", ask(learner_role), ref_done(self.learner.__ray_ready__.remote()),
                        tuple(learner_role.each)),
                *(Pending(f"rollout actor {actor_id}", ask(rollout_role), ref_done(handle.__ray_ready__.remote()),
                          tuple(rollout_role.each)) for actor_id, handle in early),
                coming_up(cfg, reward_app(cfg))]
            self.metrics = Metrics(cfg, self.run_dir, log)  # W&B starts while the roles do
            wait_until_up(roles_up, cfg.cluster.start_timeout_s, log)
            workers = ray.get(self.learner.places.remote())
            self.placement: dict = {"learner": {**workers[0], "workers": workers}, "actors": {},
                                    "driver": {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}}
            saved = ray.get(self.learner.load_checkpoint.remote()) if resume else None
            if saved:
                state = DriverState.from_dict(saved)
                self.source.restore(state.source)
                self.counters, self.first = state.counters, state.first
            self.pipeline.version = ray.get(self.learner.version.remote())
            self.checkpointed = self.version  # on disk already: the init model or the resumed checkpoint
            _truncate_jsonl(self.run_dir / "ledger.jsonl", "version", self.version)
            _truncate_jsonl(self.run_dir / "metrics.jsonl", "step", self.version)
            if resume:
                log(f"resumed at policy version {self.version}" if saved else "no checkpoint yet: starting fresh")
            self.publish()

            self.control = ray.remote(num_cpus=0)(Control).options(
                name=CONTROL_PREFIX + cfg.run.name, namespace=NAMESPACE, get_if_exists=True,
            ).remote(cfg.run.name, cfg.rollout.num_actors)
            ray.get(self.control.request.remote(cfg.rollout.num_actors))
            for actor in early:
                self.start_actor(actor)
        except BaseException:  # not up in time, a signal, or a failed start: stop what was started
            for _, handle in early:
                ray.kill(handle)
            if self.control is not None:
                ray.kill(self.control)
            if self.metrics is not None:
                self.metrics.finish({"error": "the run did not start"})
            self.stop_learner()  # and free its placement group, which outlives handles
            raise

        self.update_ref = None
        self.update_started = 0.0
        # Per-interval idle accounting (an interval ends with each update): see loop_metrics.
        self.pool.interval_start = time.monotonic()  # the first interval starts now
        self.generated = _no_generation()  # within the interval
        self.rate_from: tuple[float, int] | None = None  # (time, samples) at the first update's end
        self.created = created or time.monotonic()  # when `tame train` began: start-up counts from here
        self.startup_seconds: float | None = None  # until the first generation call: roles up, weights loaded
        self.last_scale_poll = 0.0
        self.last_loads: dict[int, LoadResult] = {}  # each actor's last load
        self.deaths_in_a_row = 0  # actor deaths since the last batch an actor produced
        self.scoring_failed_seconds = 0.0  # of the calls that came back unscored since one was scored
        self.stop_requested = False
        self.started = time.monotonic()
        self.stop = stop or StopSignal()  # set by a signal handler; checked between loop passes

    @property
    def version(self) -> int:
        """The learner's newest published policy version."""
        return self.pipeline.version

    # ----------------------------------------------------------------- weights

    def publish(self) -> None:
        """Put the learner's current version into the object store (once per version)."""
        start = time.monotonic()
        self.weights_ref = self.learner.publish.remote()
        self.weights: WeightsHandle = self.learner_get(self.weights_ref)
        self.publish_seconds = time.monotonic() - start
        assert self.weights.version == self.version, (self.weights.version, self.version)

    # ----------------------------------------------------------------- actors

    def start_actor(self, early: tuple[int, Any] | None = None) -> None:
        """A new actor, or one started before the reward service was up, loads the newest
        weights before it produces anything."""
        if early is None:
            actor_id, handle = self.pool.create(self.scorer)
        else:
            actor_id, handle = early
            handle.set_scorer.remote(self.scorer)
        self.pool.add(actor_id, handle, self.weights_ref)

    def retire(self, slot: Slot, reason: str | None = None) -> None:
        """Take an actor out of production; its prompts go back to the source."""
        self.source.give_back(self.pool.remove(slot))
        self.pipeline.lost(slot.actor_id)
        if reason:
            self.log(f"actor {slot.actor_id} removed: {reason}")

    def apply_scaling(self) -> None:
        import ray

        if time.monotonic() - self.last_scale_poll < 1.0:
            return
        self.last_scale_poll = time.monotonic()
        target, self.stop_requested = ray.get(self.control.poll.remote())
        if target != self.pool.target:
            self.log(f"scaling the rollout pool from {self.pool.target} to {target} actors")
            self.pool.target = target
        live = len(self.pool.live())
        for _ in range(target - live):
            self.start_actor()
        for slot in self.pool.drain(live - target):  # a busy actor finishes its call first
            self.retire(slot)
        self.control.report.remote({
            "run": self.cfg.run.name, "num_actors": target, "live_actors": len(self.pool),
            "policy_version": self.version, "counters": self.counters.as_dict(),
            "actors": {i: {**(self.placement["actors"].get(i) or {}), "version": s.version, "state": s.state.value}
                       for i, s in self.pool.slots.items()},
            "pending": self.pending_actors(),
            "learner": self.placement["learner"], "driver": self.placement["driver"]})

    def pending_actors(self) -> str | None:
        """The actors not up yet and why they may wait, for `tame scale` and the status; None
        when every actor is up. The run goes on with the actors it has."""
        waiting = self.pool.pending_start()
        if not waiting:
            return None
        role = roles(self.cfg, only=("rollout",))[0]
        ids = ", ".join(str(s.actor_id) for s in waiting)
        return (f"{len(waiting)} rollout actor(s) not up yet ({ids}): each asks for {ask(role)}, and Ray places "
                f"it when a node has that free, then it builds its engine; {free_on_cluster(tuple(role.each))}")

    def launch_generation(self) -> None:
        """Hand prompts to idle actors, newest weights first, as far as the staleness bound
        admits: with max_staleness 0 an actor waits for the update in flight."""
        for slot in list(self.pool.slots.values()):
            if slot.state is not SlotState.IDLE:
                continue
            if slot.version < self.version:
                self.pool.dispatch(slot, SlotState.LOADING, slot.handle.load_weights.remote(self.weights_ref))
                continue
            n = self.pipeline.prompts_to_start(slot.version)
            if n == 0:
                continue  # every sample it could start now would be trained too stale: wait
            if self.startup_seconds is None:
                self.startup_seconds = time.monotonic() - self.created
            prompts = self.source.take(n)
            slot.prompt_ids = [p.prompt_id for p in prompts]
            self.pipeline.started(slot.actor_id, n)
            self.pool.dispatch(slot, SlotState.GENERATING, slot.handle.generate.remote(prompts))

    def on_loaded(self, slot: Slot, result: LoadResult) -> None:
        """An actor whose engine does not hold exactly the published weights is replaced."""
        if result.verified is False:
            self.counters.fingerprint_mismatches += 1
            draining = slot.state is SlotState.DRAINING
            self.retire(slot, f"weight sync to version {result.policy_version} not verified: {result.problem}")
            if not draining:  # one scaled away is not replaced
                self.start_actor()
            return
        if slot.version < 0:
            import ray

            try:
                self.placement["actors"][slot.actor_id] = _node_of(slot.handle)
            except ray.exceptions.RayActorError as e:  # died right after its first load
                self.on_actor_died(slot, e)
                return
        slot.version = result.policy_version
        if result.loaded:
            self.last_loads[slot.actor_id] = result
        if not self.pool.returned(slot):  # scaled away while it was loading
            self.retire(slot)

    def on_actor_died(self, slot: Slot, error: Exception, why: str | None = None) -> None:
        """Hand the dead (or hung: `why`) actor's prompts out again; replace it unless the
        config says not to."""
        self.counters.actor_failures += 1
        draining = slot.state is SlotState.DRAINING
        self.retire(slot, f"{why or f'actor died ({type(error).__name__})'}; its {len(slot.prompt_ids)} prompt(s) "
                          "are handed out again")
        # A prompt that crashes the engine would kill every replacement: stop instead.
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row >= 3:
            raise RunError(f"rollout actors died 3 times in a row without producing a batch; the last: "
                           f"{why or error}") from error
        if draining:
            return  # it was on its way out
        if self.cfg.rollout.replace_failed:
            return  # apply_scaling starts the replacement
        self.pool.target -= 1
        self.control.request.remote(self.pool.target)  # `tame scale` sees the smaller pool
        self.log(f"rollout.replace_failed is false: carrying on with {self.pool.target} actor(s)")
        if self.pool.target == 0:
            raise RunError("the last rollout actor died and rollout.replace_failed is false; "
                           "resume with `tame train --resume` once the cluster has room")

    def check_scoring(self, batch: RolloutBatch, call_seconds: float) -> None:
        """End the run once generation calls that came back with nothing scored took
        `reward.failing_timeout_s` in all, with none scored in between: retrying cannot help a
        reward service that stays down or a rule function that fails on the same prompts each
        time they are handed out. (Their own time: waiting for an update does not count.)"""
        if batch.rollouts or not batch.failed_prompt_ids:
            self.scoring_failed_seconds = 0.0
            return
        self.scoring_failed_seconds += call_seconds
        limit = self.cfg.reward.failing_timeout_s
        if self.scoring_failed_seconds > limit:
            raise RunError(f"no generation call could be scored for {self.scoring_failed_seconds:.0f} s of calls "
                           f"(reward.failing_timeout_s {limit:g}); the last failure: "
                           f"{batch.score_error or 'scores that are not finite numbers'}")

    def on_generated(self, slot: Slot, batch: RolloutBatch) -> None:
        call_seconds = time.monotonic() - slot.call_started
        self.deaths_in_a_row = 0
        slot.tokens += batch.generated_tokens
        slot.generate_seconds += batch.generate_seconds
        self.generated["samples"] += len(batch.rollouts)
        self.generated["generate_seconds"] += batch.generate_seconds
        self.generated["score_seconds"] += batch.score_seconds
        self.generated["reference_seconds"] += batch.reference_seconds
        if batch.failed_prompt_ids:
            self.counters.failed_prompts += len(batch.failed_prompt_ids)
            self.source.give_back(batch.failed_prompt_ids)
        groups: dict[str, list[Rollout]] = {}
        for r in batch.rollouts:
            groups.setdefault(r.prompt_id, []).append(r)
        self.pipeline.finished(slot.actor_id, [Group(p, batch.policy_version, rs) for p, rs in groups.items()])
        slot.prompt_ids = []
        if not self.pool.returned(slot):
            self.retire(slot)
        self.check_scoring(batch, call_seconds)

    def to_next_deadline(self) -> float:
        """Seconds until a load or the update in flight is overdue (`check_deadlines`)."""
        now, ahead = time.monotonic(), [1e9]
        limit = self.cfg.learner.update_timeout_s
        if self.update_ref is not None and limit is not None:
            ahead.append(self.update_started + limit - now)
        ahead += [s.call_started + self.cfg.rollout.load_timeout_s - now for s in self.pool.reloading()]
        if self.cfg.rollout.generate_timeout_s is not None:
            ahead += [s.call_started + self.cfg.rollout.generate_timeout_s - now for s in self.pool.generating()]
        return max(0.0, min(ahead))

    def check_deadlines(self) -> None:
        """A weight load, a generation call or an update that takes too long is taken as
        hung: the actor is replaced (a hung generation as a dead actor); a hung learner ends
        the run."""

        now = time.monotonic()
        limit = self.cfg.rollout.generate_timeout_s
        for slot in self.pool.overdue_generations(now, limit) if limit is not None else []:
            self.counters.generate_timeouts += 1
            why = f"no answer to a generation call within rollout.generate_timeout_s {limit:g} s (taken as hung)"
            self.on_actor_died(slot, TimeoutError(why), why=why)
        limit = self.cfg.rollout.load_timeout_s
        for slot in self.pool.overdue_loads(now, limit):
            self.counters.load_timeouts += 1
            self.retire(slot, f"it did not confirm a weight load within rollout.load_timeout_s {limit:g} s; "
                              "taken as hung and replaced")  # apply_scaling starts the replacement
        limit = self.cfg.learner.update_timeout_s
        if self.update_ref is not None and limit is not None and now - self.update_started > limit:
            self.stop_learner()  # what a hung learner would still do cannot be trusted
            self.update_ref = None
            raise RunError(f"an update took longer than learner.update_timeout_s {limit:g} s, so the learner was "
                           f"stopped; resume with `tame train --resume`: {_newest_checkpoint(self.run_dir)}")

    # ----------------------------------------------------------------- learner

    def stop_learner(self) -> None:
        """Kill the learner (a sharded one's workers die with their rank 0) and free its
        placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        ray.kill(self.learner)
        if self.learner_group is not None:
            remove_placement_group(self.learner_group)

    def maybe_start_update(self) -> None:
        batch, dropped = self.pipeline.next_batch()
        if dropped:  # only an actor that fell behind makes these (see cluster.pipeline)
            self.counters.dropped_stale += sum(len(g) for g in dropped)
            self.source.give_back([g.prompt_id for g in dropped])
        if batch is None:
            return
        self.update_started = time.monotonic()
        self.update_ref = self.learner.update.remote([r for g in batch for r in g.rollouts])

    def update_result(self) -> UpdateResult:
        """The result of the update in flight; a RunError when the learner cannot go on."""
        from learner.learner import NonFiniteUpdatesError

        try:
            return self.learner_get(self.update_ref)
        except NonFiniteUpdatesError as e:
            self.update_ref = None
            self.source.give_back([g.prompt_id for g in self.pipeline.update_done(trained=False)])
            raise RunError(str(e)) from e

    def learner_get(self, ref):
        """`ray.get` of a learner call; a RunError when the learner or one of its workers died."""
        import ray

        from learner.workers import WorkerDiedError

        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, WorkerDiedError) as e:
            raise self.learner_died(e) from e

    def learner_died(self, e: Exception) -> RunError:
        """The error that ends a run whose learner (or one of its workers) died in any call."""
        import ray

        what = e.cause if isinstance(e, ray.exceptions.RayTaskError) else type(e).__name__
        return RunError(f"the learner died ({what}); resume with `tame train --resume`: "
                        f"{_newest_checkpoint(self.run_dir)}")

    def on_updated(self, result: UpdateResult) -> None:
        self.update_ref = None
        batch = self.pipeline.update_done(trained=not result.skipped)
        if result.skipped:
            # Not trained on: the prompts come back, the actors keep the previous weights.
            self.counters.skipped_updates += 1
            self.source.give_back([g.prompt_id for g in batch])
            self.log(f"update skipped: non-finite values ({self.counters.skipped_updates} so far)")
            return
        assert result.version == self.version, (result.version, self.version)
        rollouts = [r for g in batch for r in g.rollouts]
        self.counters.samples += len(rollouts)
        staleness = [self.version - 1 - g.policy_version for g in batch]
        with (self.run_dir / "ledger.jsonl").open("a") as f:
            f.write(json.dumps({"version": self.version, "prompts": [g.prompt_id for g in batch],
                                "record_versions": [g.policy_version for g in batch],
                                "actors": sorted({r.actor_id for r in rollouts})}) + "\n")
        self.publish()
        metrics = {**result.metrics, **self.loop_metrics(staleness)}
        if self.judge is not None:
            metrics.update(self.judge(rollouts))
        self.first = self.first or metrics
        self.last = metrics
        self.metrics.step(self.version, metrics, self.cfg.train.total_updates)
        if self.version % self.cfg.logging.sample_every == 0:
            self.metrics.samples(self.version, [
                {"prompt": r.prompt_text, "response": r.response_text, "reward": r.score,
                 "policy_version": r.policy_version} for r in rollouts[: self.cfg.logging.samples_in_table]])
        if self.version % self.cfg.learner.checkpoint_every == 0:
            self.checkpoint()

    def loop_metrics(self, staleness: list[int]) -> dict[str, float]:
        """Staleness, sync and throughput figures of the update just ended. Idle shares are of
        the interval since the previous update ended: the learner's is the time before this
        update started; the actors' is the time they had nothing to generate or load."""
        now = time.monotonic()
        start = self.pool.interval_start
        interval = max(now - start, 1e-9)
        learner_idle = max(0.0, self.update_started - start)
        actor_idle = self.pool.idle_share(now)  # and the next interval starts
        generated = self.generated
        self.generated = _no_generation()
        samples = self.counters.samples
        if self.rate_from is None:
            self.rate_from = (now, samples)
        out = {
            "rollout/staleness_mean": sum(staleness) / len(staleness),
            "rollout/staleness_max": max(staleness),
            "rollout/dropped_stale": self.counters.dropped_stale,
            "rollout/failed_prompts": self.counters.failed_prompts,
            "rollout/queue_depth": self.pipeline.queued_samples,
            "rollout/num_actors": len(self.pool),
            "rollout/actor_failures": self.counters.actor_failures,
            "sync/version": self.version,
            "sync/bytes": self.weights.nbytes,
            "sync/publish_seconds": self.publish_seconds,
            "sync/load_seconds_max": max((r.seconds for r in self.last_loads.values()), default=0.0),
            "sync/verify_seconds_max": max((r.verify_seconds for r in self.last_loads.values()), default=0.0),
            "sync/probe_rms_error_max": max((r.probe_rms_error for r in self.last_loads.values()), default=0.0),
            "sync/fingerprint_mismatches": self.counters.fingerprint_mismatches,
            "perf/step_seconds": interval,
            "perf/update_seconds_wall": now - self.update_started,
            "perf/samples": samples,
            "perf/samples_per_s": self.samples_per_s(now),
            "perf/learner_idle_share": learner_idle / interval,
            "perf/actor_idle_share": actor_idle,
            # What one sample cost the actors in this interval: the pipeline's other side.
            "perf/generate_seconds_per_sample": generated["generate_seconds"] / max(generated["samples"], 1),
            "perf/score_seconds_per_sample": generated["score_seconds"] / max(generated["samples"], 1),
            "perf/reference_seconds_per_sample": generated["reference_seconds"] / max(generated["samples"], 1),
            "learner/skipped_updates": self.counters.skipped_updates,
        }
        for slot in self.pool.slots.values():
            if slot.generate_seconds > 0:
                out[f"rollout/actor_{slot.actor_id}/tokens_per_s"] = slot.tokens / slot.generate_seconds
        return out

    def samples_per_s(self, now: float) -> float:
        """Training throughput from the end of the first update, after the engines warmed up and
        the pipeline filled (start-up is reported on its own); until then, from the loop's start."""
        samples = self.counters.samples
        if self.rate_from is None or samples == self.rate_from[1]:
            return samples / max(now - self.started, 1e-9)
        return (samples - self.rate_from[1]) / max(now - self.rate_from[0], 1e-9)

    def in_flight(self) -> list[str]:
        """Prompts handed out but not trained on yet: a resumed run hands them out again."""
        ids = self.pipeline.in_flight_prompts()
        for slot in self.pool.slots.values():
            ids += slot.prompt_ids
        return ids

    def checkpoint(self) -> str:
        """Save this version's checkpoint. With learner.async_checkpoints the learner returns
        once it is staged and writes it while training goes on; its next save, or
        `wait_for_checkpoint`, raises if that writing failed."""
        state = DriverState(self.source.state(self.in_flight()), self.counters, self.first)
        path = self.learner_get(self.learner.save_checkpoint.remote(state.to_dict()))
        self.checkpointed = self.version  # only once saved: a failed one is tried again at the end
        return path

    def wait_for_checkpoint(self) -> None:
        """Wait until the checkpoint the learner writes in the background is complete. If its
        writing failed, the version counts as not checkpointed, so that the end of the run
        tries again."""
        try:
            self.learner_get(self.learner.wait_for_checkpoint.remote())
        except Exception:
            self.checkpointed = -1
            raise

    # ----------------------------------------------------------------- the loop

    def done(self) -> bool:
        total = self.cfg.train.total_samples
        return (self.stop_requested or self.stop.name is not None or self.version >= self.cfg.train.total_updates
                or (total is not None and self.counters.samples >= total))

    def run(self) -> dict:
        import ray

        from learner.workers import WorkerDiedError

        self.started = time.monotonic()
        self.stop.started = True  # from here a signal finishes the update in flight and checkpoints
        self.log(f"training to version {self.cfg.train.total_updates} with {self.pool.target} rollout actor(s), "
                 f"max_staleness {self.k}")
        while not self.done():
            # 1. follow `tame scale`
            self.apply_scaling()
            # 2. keep the actors busy within the staleness bound
            self.launch_generation()
            # 3. train when a batch of fresh records is ready
            self.maybe_start_update()
            # 4. wait for whichever actor or learner call finishes first
            pending = self.pool.waiting_on()
            refs = list(pending) + ([self.update_ref] if self.update_ref is not None else [])
            if not refs:  # e.g. `tame scale --actors 0`: nothing to wait on
                time.sleep(0.2)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=min(1.0, self.to_next_deadline()))
            if ready:  # every call done by now, so that none of them is judged overdue below
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            for ref in ready:
                if ref is self.update_ref:
                    self.on_updated(self.update_result())
                    continue
                slot = pending[ref]
                try:
                    result = ray.get(ref)
                except WorkerDiedError as e:  # a load of the version a dying sharded learner published
                    raise self.learner_died(e) from e
                except ray.exceptions.RayActorError as e:
                    self.on_actor_died(slot, e)
                    continue
                except ray.exceptions.RayTaskError as e:  # the call raised: replaced as if it had died
                    self.on_actor_died(slot, e, f"its call raised {type(e.cause).__name__}: {e.cause}")
                    continue
                if isinstance(result, LoadResult):
                    self.on_loaded(slot, result)
                else:
                    self.on_generated(slot, result)
            self.check_deadlines()
        if self.stop.name is None:
            return self.finish()
        self.log(f"{self.stop.name}: finishing the update in flight and writing a checkpoint "
                 "(send it again to stop at once)")
        return self.finish(error=f"interrupted ({self.stop.name})")

    def finish(self, error: str | None = None) -> dict:
        """Finish the update in flight, write the final checkpoint and summary.json. After an
        interruption or a failure (`error`), as much of that as the learner still allows."""
        path = None
        try:
            if self.update_ref is not None:
                self.on_updated(self.update_result())
            if self.checkpointed != self.version:
                self.checkpoint()
            self.wait_for_checkpoint()  # the summary names a complete checkpoint or none
            if self.version > 0:
                path = str(self.run_dir / "checkpoints" / f"version-{self.version:06d}")
        except Exception as e:  # the failure that brought us here may have taken the learner
            if error is None:
                raise
            self.log(f"no final checkpoint: {type(e).__name__}: {e}")
        now = time.monotonic()
        wall = now - self.created
        summary = {
            "run": self.cfg.run.name,
            "steps": self.version,
            "policy_version": self.version,
            "samples": self.counters.samples,
            "reward_start": self.first.get("objective/scores"),
            "reward_end": self.last.get("objective/scores"),
            "kl_start": self.first.get("objective/kl"),
            "kl_end": self.last.get("objective/kl"),
            "wall_seconds": wall,
            "startup_seconds": self.startup_seconds,
            "samples_per_second": self.samples_per_s(now),
            "samples_per_second_overall": self.counters.samples / max(wall, 1e-9),
            "checkpoint": path,
            "data_position": {"epoch": self.source.epoch, "position": self.source.position},
            "outstanding_prompts": self.in_flight() + list(self.source.returned),
            "placement": self.placement,
            "error": error,
            **{k: v for k, v in self.counters.as_dict().items() if k != "samples"},
        }
        write_json(self.run_dir / "summary.json", summary)
        self.metrics.finish(summary)
        return summary

    def shutdown(self) -> None:
        import ray
        from ray import serve

        for slot in list(self.pool.slots.values()):
            ray.kill(slot.handle)
        self.stop_learner()
        ray.kill(self.control)
        if started_here():
            return  # this process's own Ray: Serve stops with it when the process exits
        _delete_reward_app(self.cfg)
        try:  # Serve this run started goes with it, unless another run or service deploys on it now
            if self.owns_serve and not serve.status().applications:
                serve.shutdown()
        except Exception:  # Serve may already be gone with a dying cluster
            pass


# --------------------------------------------------------------------------- entry point


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return any(a["name"] == SERVE_CONTROLLER_NAME and a["namespace"] == SERVE_NAMESPACE
               for a in ray.util.list_named_actors(all_namespaces=True))


def _node_of(actor) -> dict:
    """The Ray node an actor landed on, and its process id."""
    import ray

    return ray.get(actor.__ray_call__.remote(
        lambda _self: {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}))


def _truncate_jsonl(path: Path, key: str, last: int) -> None:
    """Drop the lines of updates after `last`: a resumed run redoes them. A line a killed
    driver left half-written is one of them (each line goes out before its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)[key] <= last:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(line + "\n" for line in keep))


def host_memory(cfg: TameConfig) -> int | None:
    """This machine's memory when every process of the run lives on it: a CPU run on a Ray
    that `tame train` starts here. None otherwise."""
    import psutil

    from cluster.shared.ray_cluster import starts_local

    on_cpu = cfg.learner.device == "cpu" and cfg.rollout.num_gpus == 0 and cfg.reward.num_gpus == 0
    return psutil.virtual_memory().total if on_cpu and starts_local(cfg.cluster.address) else None


def check_inputs(cfg: TameConfig, log: Callable[[str], None] = lambda _: None) -> None:
    """Fail with exit code 2 on missing or wrong-kind inputs, or a run that would not fit
    its memory, before anything starts."""
    from cluster.plan import check
    from reward_service.rewards import check_reward_config

    check_model_folder("model.policy", cfg.model.policy, "causal LM")
    if cfg.model.reward is not None:
        check_model_folder("model.reward", cfg.model.reward, "reward model")
    worker = check(cfg, host_memory(cfg)).learner
    log(f"memory plan: a learner worker holds {worker.update_bytes / 2**30:.1f} GiB at its update peak "
        f"({worker.budget.source}; `tame plan` has the whole plan)")
    if cfg.data.chat_template:
        require_chat_template(cfg.model.policy, "model.policy")
    check_reward_config(cfg)  # the reward model's folder and template, the rule functions
    load_prompts(cfg.data.prompts)  # names the file and line of a bad record
    if cfg.ppo.ptx_data is not None:
        from learner.data import read_demonstrations

        read_demonstrations(cfg.ppo.ptx_data)


class TokenizerChecks(threading.Thread):
    """What needs the policy's tokenizer, checked in a thread while Ray starts (`check` raises
    what it found): every prompt within `data.max_prompt_tokens`, and leaving the engine room
    for a response (a longer one would fail its generation call mid-run, and again after
    every resume); and a critic made from the reward model, which reads the policy's token
    ids, giving each of them to the same token."""

    def __init__(self, cfg: TameConfig):
        super().__init__(daemon=True, name="tokenizer-checks")
        self.cfg, self.error = cfg, None
        self.start()

    def run(self) -> None:
        from cluster.shared.data import check_prompt_lengths
        from cluster.shared.startup import heavy_imports

        cfg = self.cfg
        try:
            with heavy_imports():
                from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy)
            if cfg.rollout.max_model_len <= cfg.data.max_prompt_tokens:
                limit, key = cfg.rollout.max_model_len - 1, "rollout.max_model_len - 1"
            else:
                limit, key = cfg.data.max_prompt_tokens, "data.max_prompt_tokens"
            check_prompt_lengths(cfg.data.prompts, tokenizer, cfg.data.chat_template, limit, key)
            if cfg.ppo.advantage == "gae" and cfg.learner.critic == "reward" and cfg.model.reward is not None:
                reward = AutoTokenizer.from_pretrained(cfg.model.reward).get_vocab()
                if any(reward.get(token) != i for token, i in tokenizer.get_vocab().items()):
                    raise ConfigError(
                        f"learner.critic: 'reward' makes the critic from model.reward ({cfg.model.reward}), which "
                        "would read the policy's token ids, but its tokenizer gives some of them to other tokens "
                        "than model.policy's does: use learner.critic policy")
        except Exception as e:  # raised in the caller's thread by check()
            self.error = e

    def check(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def connect(cfg: TameConfig, log: Callable[[str], None]) -> None:
    connect_ray(cfg.cluster.address, cfg.cluster.num_cpus, log, namespace=NAMESPACE,
                runtime_env={"env_vars": dict(ENGINE_ENV)}, log_to_driver=False)


def train(cfg: TameConfig, resume: bool = False, log: Callable[[str], None] = print,
          judge: Callable[[list[Rollout]], dict] | None = None) -> dict:
    """Run PPO with the actor-learner loop until the configured number of updates.

    Ctrl-C or SIGTERM stops at the next safe point and raises KeyboardInterrupt after the
    final checkpoint; a failure raises after it (RunError when the run cannot go on)."""
    created = time.monotonic()
    run_dir = cfg.run_dir
    if not resume and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise UserError(f"run.name: {run_dir} already holds checkpoints: pass --resume to continue "
                        f"it, or choose another run.name")
    check_inputs(cfg, log)
    if resume:
        _check_resumable(cfg)
    if starts_local(cfg.cluster.address):
        check_local(cfg)  # the Ray about to start here: its CPUs are known without starting it
    tokenizers = TokenizerChecks(cfg)  # tokenises the prompts while Ray starts
    connect(cfg, log)
    check_cluster(cfg)  # a run that can never be placed fails here, before it writes anything
    tokenizers.check()
    log(f"run {cfg.run.name} in {run_dir} (tame's code from {Path(__file__).resolve().parents[1]})")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if not resume:
        for stale in ("ledger.jsonl", "metrics.jsonl", "summary.json", "wandb_id"):
            (run_dir / stale).unlink(missing_ok=True)
    stop = StopSignal()
    previous = _stop_on_signals(stop)

    def log_stage(message: str) -> None:  # what the start is busy with, for a signal's message
        stop.stage = message
        log(message)

    loop = None
    try:
        loop = Loop(cfg, resume, log_stage, judge, stop, created)
        summary = loop.run()
    except KeyboardInterrupt:  # a signal while starting, or a second one: stop now
        if not stop.started:
            log(f"stopped while starting ({stop.stage}); nothing was trained")
        else:
            log(f"stopped at once; {_newest_checkpoint(run_dir)}")
        raise
    except Exception as e:  # the run cannot go on: save what was trained
        if loop is None:
            raise  # it failed to start; its actors go with their handles
        why = str(e) if isinstance(e, RunError) else f"{type(e).__name__}: {e}"
        summary = loop.finish(error=why)
        log(f"{why}; " + _where_saved(summary, run_dir))
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if loop is not None:
            loop.shutdown()  # every process the run started
        else:
            _delete_reward_app(cfg)
    if summary["error"]:
        log(f"{summary['error']}; " + _where_saved(summary, run_dir))
        raise Interrupted(stop.signum)
    log(f"done: {summary['steps']} updates, {summary['samples']} samples in {summary['wall_seconds']:.0f}s, "
        f"{summary['startup_seconds'] or 0:.0f}s of it starting up; {summary['samples_per_second']:.1f} samples/s "
        f"after the first update; summary in {run_dir / 'summary.json'}")
    return summary


def _check_resumable(cfg: TameConfig) -> None:
    """A GAE run cannot resume from a checkpoint trained without a critic (the other way
    round the critic is just not loaded), nor a sharded learner from a checkpoint written
    before checkpoints were sharded."""
    from learner.checkpoints import SHARDED, complete

    found = complete(cfg.run_dir)
    if found and cfg.ppo.advantage == "gae" and not (found[-1] / "critic").is_dir():
        raise UserError(f"ppo.advantage: {found[-1]} was trained without a critic (another ppo.advantage "
                        "than gae); resume it with the ppo.advantage it was trained with")
    if found and cfg.learner.num_workers > 1 and not (found[-1] / SHARDED).is_dir():
        raise UserError(f"learner.num_workers: {found[-1]} was written by a tame without sharded checkpoints; "
                        "resume it with learner.num_workers 1 (its next checkpoint can be resumed with any number)")


def _where_saved(summary: dict, run_dir: Path) -> str:
    if summary["checkpoint"]:
        return f"checkpoint at version {summary['steps']} in {summary['checkpoint']}"
    return f"no new checkpoint; {_newest_checkpoint(run_dir)}"


def _newest_checkpoint(run_dir: Path) -> str:
    """Where to resume from, said only when there is a checkpoint to resume from."""
    saved = sorted(p for p in (run_dir / "checkpoints").glob("version-*") if (p / "trainer_state.pt").is_file())
    return f"the newest complete checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"


def reward_app(cfg: TameConfig) -> str:
    """The run's own Serve application: runs sharing a cluster (and `tame serve-reward`, whose
    application is "tame-reward") never score with each other's reward model."""
    return f"tame-reward-{cfg.run.name}"


def _delete_reward_app(cfg: TameConfig) -> None:
    """The run's reward app, the one part that would outlive the driver (at the end of a run,
    and after a failed start)."""
    from ray import serve

    try:
        serve.delete(reward_app(cfg))
    except Exception:  # Serve never started, or is gone with the cluster
        pass


class StopSignal:
    """The signal (SIGINT, SIGTERM) that asked the run to stop; the loop checks it."""

    name: str | None = None
    signum: int = signal.SIGINT
    started: bool = False
    """Whether the loop runs: before it, there is nothing to finish or checkpoint."""
    stage: str = "connecting to Ray"
    """What the start is busy with (its last log line)."""


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run; the CLI exits with 128 + `signum` (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _stop_on_signals(stop: StopSignal) -> dict:
    """Ctrl-C (SIGINT) or `ray job stop` (SIGTERM) ask the loop to stop at its next safe point:
    the update in flight is finished, a checkpoint and the summary are written. A second
    signal stops at once, and so does the first while the run is still starting (nothing to
    checkpoint yet, and a start can wait long). Returns the handlers replaced (none outside
    the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, _frame):
        if not stop.started or stop.name is not None:
            raise Interrupted(signum)
        stop.name, stop.signum = signal.Signals(signum).name, signum  # only flags: the loop acts on them

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
