"""The actor-learner loop (`Loop`), over the roles `cluster.launch` started (`cluster.train`
is `tame train` around it).

The loop runs in the driver and owns the prompt cursor and the experience pipeline
(`cluster.pipeline`); the rollout actors (vLLM), the reward service (Serve) and the learner
run as Ray actors. Each learner update ends by publishing its version v into the object store
with its probes (a fingerprint, `cluster.shared.transport`); an actor loads it between two
steps of its engine, its prompts in flight going on, and checks its engine's own probes
against them. An actor keeps its engine full, starting a prompt whenever one ends, but only
if every sample of it will be trained within `max_staleness` versions of the weights it
starts under (`Pipeline.prompts_to_start`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cluster.autoscale import Autoscaler, Interval
from cluster.control import StopSignal, ask_for_room, status
from cluster.launch import Launched, newest_checkpoint, node_of
from cluster.metrics import Throughput, load_figures, reward_spread, version_spans
from cluster.pipeline import Pipeline, PromptGroup
from cluster.pool import Slot, SlotState
from cluster.prompts import PromptSource
from cluster.shared.config import TameConfig
from cluster.shared.data import load_prompts
from cluster.shared.errors import NonFiniteUpdatesError, RunError, WorkerDiedError
from cluster.shared.files import write_json
from cluster.shared.records import LoadResult, Rollout, RolloutBatch, UpdateResult
from cluster.state import DriverState, ScoringWatch, append_ledger


class Loop:
    """The actor-learner loop, in the driver, over the roles `launch` started.

    One turn (`run`): (1) follow `tame scale` and a stop asked through the control actor;
    (2) keep the actors' engines full as far as the staleness bound admits, an actor holding
    older weights loading the newest first; (3) start a learner update once a batch of fresh
    records is queued; (4) wait for whichever actor or learner call finishes first and hand
    its result to the handler named after it (`on_loaded`, `on_generated`, `on_updated`,
    `on_actor_died`), then replace what overran its deadline. It turns until the last update
    (or `train.total_samples`, a stop, a signal); `finish` then writes the final checkpoint
    and summary.json.
    """

    def __init__(
        self,
        cfg: TameConfig,
        roles: Launched,
        log: Callable[[str], None],
        judge: Callable[[list[Rollout]], dict] | None = None,
        stop: StopSignal | None = None,
        created: float | None = None,
    ):
        self.cfg, self.roles, self.log, self.judge = cfg, roles, log, judge
        self.run_dir, self.learner, self.pool = cfg.run_dir, roles.learner, roles.pool
        self.stop = stop or StopSignal()  # set by a signal handler; checked between turns
        state = roles.restored or DriverState(source={})  # where the resumed run stopped, or nothing
        self.source = PromptSource(load_prompts(cfg.data.prompts), cfg.run.seed, cfg.data.shuffle)
        if state.source:
            self.source.restore(state.source)
        self.counters, self.first_update_metrics = state.counters, state.first_update_metrics
        self.last_update_metrics: dict[str, float] = {}
        self.pipeline = Pipeline.for_run(cfg, roles.weights.version)
        self.weights = roles.weights  # the newest version, which every actor loads
        self.checkpointed = self.version  # on disk already: the init model or the resumed checkpoint
        self.update_ref, self.update_started = None, 0.0
        self.throughput = Throughput(created or time.monotonic())
        self.last_loads: dict[int, LoadResult] = {}  # each actor's last load
        self.last_scale_poll, self.stop_requested = 0.0, False
        self.deaths_in_a_row = 0  # actor deaths since the last batch an actor produced
        self.scoring = ScoringWatch(cfg.reward.failing_timeout_s)
        scale = cfg.rollout.autoscale  # the pool's size from what the loop measures, until `tame scale`
        self.autoscaler = scale and Autoscaler(
            scale, cfg.train.max_staleness, self.pipeline.most_calls(), roles.pool.target
        )

    @property
    def version(self) -> int:
        """The learner's newest published policy version."""
        return self.pipeline.version

    def done(self) -> bool:
        if self.stop_requested or self.stop.name is not None:
            return True
        total = self.cfg.train.total_samples
        return self.version >= self.cfg.train.total_updates or (total is not None and self.counters.samples >= total)

    def run(self) -> dict:
        import ray

        self.throughput.started = self.pool.interval_start = time.monotonic()  # the first interval starts now
        self.stop.started = True  # from here a signal finishes the update in flight and checkpoints
        self.log(
            f"training to version {self.cfg.train.total_updates} with {self.pool.target} rollout actor(s), "
            f"max_staleness {self.cfg.train.max_staleness}"
        )
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
                    raise self.learner.died(e) from e
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
        self.log(
            f"{self.stop.name}: finishing the update in flight and writing a checkpoint (send it again to stop at once)"
        )
        return self.finish(error=f"interrupted ({self.stop.name})")

    # ----------------------------------------------------------------- 1. scaling

    def apply_scaling(self) -> None:
        import ray

        if time.monotonic() - self.last_scale_poll < 1.0:
            return
        self.last_scale_poll = time.monotonic()
        target, self.stop_requested, by_user = ray.get(self.roles.control.poll.remote())
        if by_user and self.autoscaler is not None:
            self.autoscaler = None
            self.log(f"`tame scale` asked for {target} actors: rollout.autoscale is off for the rest of the run")
        if target != self.pool.target:
            self.log(f"scaling the rollout pool from {self.pool.target} to {target} actors")
            self.pool.target = target
        live = len(self.pool.live())
        for _ in range(target - live):
            self.start_actor()
        for slot in self.pool.drain(live - target):  # one holding prompts finishes them first
            self.retire(slot)
        self.roles.control.report.remote(
            status(self.cfg, self.pool, self.roles.placement, self.version, self.counters, self.autoscaler)
        )

    def start_actor(self) -> None:
        """A new actor loads the newest weights before it produces anything."""
        actor_id, handle = self.pool.create(self.roles.scorer)
        self.pool.add(actor_id, handle, self.weights)

    def retire(self, slot: Slot, reason: str | None = None) -> None:
        """Take an actor out of production; its prompts go back to the source."""
        self.source.give_back(self.pool.remove(slot))
        self.pipeline.lost(slot.actor_id)
        if reason:
            self.log(f"actor {slot.actor_id} removed: {reason}")

    # ----------------------------------------------------------------- 2. generation

    def launch_generation(self) -> None:
        """Keep every actor's engine full as far as the staleness bound admits (with
        max_staleness 0 an actor waits for the update in flight). An actor holding older weights
        loads the newest first, between two engine steps: its prompts in flight go on under
        them (`rollout.inflight_updates`; with `drain` it loads once they have ended)."""
        for slot in list(self.pool.slots.values()):
            if slot.pending is not None:
                continue
            if slot.state is SlotState.DRAINING:  # scaled away: it finishes what it holds, then leaves
                self.pool.dispatch(slot, SlotState.DRAINING, slot.handle.collect.remote([]))
                continue
            newer = slot.version < self.version
            if newer and not (slot.prompt_ids and self.cfg.rollout.inflight_updates == "drain"):
                self.pool.dispatch(slot, SlotState.LOADING, slot.handle.load_weights.remote(self.weights))
                continue
            n = 0 if newer else self.pipeline.prompts_to_start(slot.version, held=len(slot.prompt_ids))
            if n == 0 and not slot.prompt_ids:
                continue  # every sample it could start now would be trained too stale: wait
            prompts = self.source.take(n)
            if prompts:
                self.throughput.generation_starts()
                slot.prompt_ids += [p.prompt_id for p in prompts]
                self.pipeline.started(slot.actor_id, n, slot.version)
            self.pool.dispatch(slot, SlotState.GENERATING, slot.handle.collect.remote(prompts))

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

            self.pool.mark_up(slot)
            try:
                self.roles.placement["actors"][slot.actor_id] = node_of(slot.handle)
            except ray.exceptions.RayActorError as e:  # died right after its first load
                self.on_actor_died(slot, e)
                return
        slot.version = result.policy_version
        if result.loaded:
            self.last_loads[slot.actor_id] = result
        if not self.pool.returned(slot) and not slot.prompt_ids:  # scaled away while it was loading
            self.retire(slot)

    def on_generated(self, slot: Slot, batch: RolloutBatch) -> None:
        """Some of the actor's prompts ended: their groups join the queue whole."""
        call_seconds = time.monotonic() - slot.call_started
        if batch.prompt_ids:
            self.deaths_in_a_row = 0
        slot.tokens += batch.generated_tokens
        slot.generate_seconds += batch.generate_seconds
        self.throughput.generated.add(batch)
        if batch.failed_prompt_ids:
            self.counters.failed_prompts += len(batch.failed_prompt_ids)
            self.source.give_back(batch.failed_prompt_ids)
        for prompt_id in batch.prompt_ids:
            slot.prompt_ids.remove(prompt_id)
        groups: dict[str, list[Rollout]] = {}
        for r in batch.rollouts:
            groups.setdefault(r.prompt_id, []).append(r)
        self.pipeline.finished(
            slot.actor_id, [PromptGroup(p, rs[0].policy_version, rs) for p, rs in groups.items()], batch.prompt_versions
        )
        if not self.pool.returned(slot) and not slot.prompt_ids:  # scaled away and done
            self.retire(slot)
        self.scoring.after_call(batch, call_seconds)

    # ----------------------------------------------------------------- 3. updates

    def maybe_start_update(self) -> None:
        batch, dropped = self.pipeline.next_batch()
        if dropped:  # only an actor that fell behind makes these (see cluster.pipeline)
            self.counters.dropped_stale += sum(len(g) for g in dropped)
            self.source.give_back([g.prompt_id for g in dropped])
        if batch is None:
            return
        self.update_started = time.monotonic()
        self.update_ref = self.learner.handle.update.remote([r for g in batch for r in g.rollouts])

    def update_result(self) -> UpdateResult:
        """The result of the update in flight; a RunError when the learner cannot go on."""
        try:
            return self.learner.get(self.update_ref)
        except NonFiniteUpdatesError as e:
            self.update_ref = None
            self.source.give_back([g.prompt_id for g in self.pipeline.update_done(trained=False)])
            raise RunError(str(e)) from e

    def on_updated(self, result: UpdateResult) -> None:
        self.update_ref = None
        batch = self.pipeline.update_done(trained=not result.skipped)
        if result.skipped:
            # Not trained on: the prompts come back, the actors keep the previous weights.
            self.counters.skipped_updates += 1
            self.source.give_back([g.prompt_id for g in batch])
            self.log(f"update skipped: non-finite values ({self.counters.skipped_updates} so far)")
            return
        assert result.version == result.weights.version == self.version, (result.version, self.version)
        self.weights = result.weights  # published as the update's last step
        rollouts = [r for g in batch for r in g.rollouts]
        self.counters.samples += len(rollouts)
        staleness = [self.version - 1 - g.policy_version for g in batch]
        append_ledger(self.run_dir / "ledger.jsonl", self.version, batch)
        metrics = {**result.metrics, **self.loop_metrics(staleness, result.metrics.get("perf/publish_seconds"))}
        metrics.update(reward_spread(rollouts))
        metrics.update(version_spans(rollouts))
        metrics.update(self.autoscale(metrics, len(rollouts)))
        if self.judge is not None:
            metrics.update(self.judge(rollouts))
        self.first_update_metrics = self.first_update_metrics or metrics
        self.last_update_metrics = metrics
        self.roles.metrics.step(self.version, metrics, self.cfg.train.total_updates)
        if self.version % self.cfg.logging.sample_every == 0:
            self.roles.metrics.samples(self.version, rollouts[: self.cfg.logging.samples_in_table])
        if self.version % self.cfg.learner.checkpoint_every == 0:
            self.checkpoint()

    def loop_metrics(self, staleness: list[int], publish_seconds: float | None) -> dict[str, float]:
        """Staleness, sync and throughput figures of the update just ended (whose last step,
        the publish, took `publish_seconds`). Idle shares are of the interval since the previous
        update ended (`Throughput.update_ended`); the actors' is the time they had nothing to
        generate or load."""
        now = time.monotonic()
        start = self.pool.interval_start
        actor_idle, self.busy_actor_seconds = self.pool.close_interval(now)  # and the next interval starts
        return {
            "rollout/staleness_mean": sum(staleness) / len(staleness),
            "rollout/staleness_max": max(staleness),
            "rollout/queue_depth": self.pipeline.queued_samples,
            "rollout/num_actors": len(self.pool),
            "sync/version": self.version,
            "sync/bytes": self.weights.nbytes,
            "sync/publish_seconds": publish_seconds,
            **load_figures(self.last_loads.values()),
            **self.counters.metrics(),
            **self.throughput.update_ended(now, self.counters.samples, start, self.update_started, actor_idle),
            **self.pool.tokens_per_s(),
        }

    def autoscale(self, metrics: dict, samples: int) -> dict:
        """Feed the update's interval to the autoscale rule; apply its decision. Returns the
        decision's figures for the metrics (none when rollout.autoscale is off)."""
        if self.autoscaler is None:
            return {}
        interval = Interval(
            metrics["perf/step_seconds"], samples, metrics["perf/update_seconds_wall"], self.busy_actor_seconds
        )
        decision = self.autoscaler.observe(interval, can_grow=not self.pool.pending_start())
        if decision is not None and decision.changed:
            self.log(f"rollout.autoscale: {decision.reason}")
            self.pool.target = decision.target
            self.roles.control.request.remote(decision.target, by_user=False)
            if decision.target > len(self.pool):
                ask_for_room(self.cfg, decision.target)
        last = self.autoscaler.last
        return {"rollout/autoscale_target": self.autoscaler.target, "rollout/autoscale_reason": last and last.reason}

    def checkpoint(self) -> str:
        """Save this version's checkpoint. With learner.async_checkpoints the learner returns
        once it is staged and writes it while training goes on; its next save, or
        `wait_for_checkpoint`, raises if that writing failed."""
        state = DriverState(self.source.state(self.in_flight()), self.counters, self.first_update_metrics)
        path = self.learner.get(self.learner.handle.save_checkpoint.remote(state.to_dict()))
        self.checkpointed = self.version  # only once saved: a failed one is tried again at the end
        return path

    def wait_for_checkpoint(self) -> None:
        """Wait until the checkpoint the learner writes in the background is complete. If its
        writing failed, the version counts as not checkpointed, so that the end of the run
        tries again."""
        try:
            self.learner.get(self.learner.handle.wait_for_checkpoint.remote())
        except Exception:
            self.checkpointed = -1
            raise

    def in_flight(self) -> list[str]:
        """Prompts handed out but not trained on yet: a resumed run hands them out again."""
        return self.pipeline.in_flight_prompts() + self.pool.held_prompts()

    # ----------------------------------------------------------------- 4. failures and deadlines

    def on_actor_died(self, slot: Slot, error: Exception, why: str | None = None) -> None:
        """Hand the dead (or hung: `why`) actor's prompts out again; replace it unless the
        config says not to."""
        self.counters.actor_failures += 1
        draining = slot.state is SlotState.DRAINING
        self.retire(
            slot,
            f"{why or f'actor died ({type(error).__name__})'}; its {len(slot.prompt_ids)} prompt(s) "
            "are handed out again",
        )
        # A prompt that crashes the engine would kill every replacement: stop instead.
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row >= 3:
            raise RunError(
                f"rollout actors died 3 times in a row without producing a batch; the last: {why or error}"
            ) from error
        if draining:
            return  # it was on its way out
        if self.cfg.rollout.replace_failed:
            return  # apply_scaling starts the replacement
        self.pool.target -= 1
        self.roles.control.request.remote(self.pool.target, by_user=False)  # `tame scale` sees the smaller pool
        if self.autoscaler is not None:
            self.autoscaler.resized(self.pool.target)
        self.log(f"rollout.replace_failed is false: carrying on with {self.pool.target} actor(s)")
        if self.pool.target == 0:
            raise RunError(
                "the last rollout actor died and rollout.replace_failed is false; "
                "resume with `tame train --resume` once the cluster has room"
            )

    def to_next_deadline(self) -> float:
        """Seconds until a load or the update in flight is overdue (`check_deadlines`)."""
        now, ahead = time.monotonic(), [1e9]
        limit = self.cfg.learner.update_timeout_s
        if self.update_ref is not None and limit is not None:
            ahead.append(self.update_started + limit - now)
        rollout = self.cfg.rollout
        ahead.append(self.pool.to_next_deadline(now, rollout.load_timeout_s, rollout.generate_timeout_s))
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
            self.retire(
                slot,
                f"it did not confirm a weight load within rollout.load_timeout_s {limit:g} s; "
                "taken as hung and replaced",
            )  # apply_scaling starts the replacement
        limit = self.cfg.learner.update_timeout_s
        if self.update_ref is not None and limit is not None and now - self.update_started > limit:
            self.learner.stop()  # what a hung learner would still do cannot be trusted
            self.update_ref = None
            raise RunError(
                f"an update took longer than learner.update_timeout_s {limit:g} s, so the learner was "
                f"stopped; resume with `tame train --resume`: {newest_checkpoint(self.run_dir)}"
            )

    # ----------------------------------------------------------------- the end

    def finish(self, error: str | None = None) -> dict:
        """Finish the update in flight, write the final checkpoint and summary.json. After an
        interruption or a failure (`error`), as much of that as the learner still allows."""
        from learner.checkpoints import path_of

        path = None
        try:
            if self.update_ref is not None:
                self.on_updated(self.update_result())
            if self.checkpointed != self.version:
                self.checkpoint()
            self.wait_for_checkpoint()  # the summary names a complete checkpoint or none
            if self.version > 0:
                path = str(path_of(self.run_dir, self.version))
        except Exception as e:  # the failure that brought us here may have taken the learner
            if error is None:
                raise
            self.log(f"no final checkpoint: {type(e).__name__}: {e}")
        first, last = self.first_update_metrics, self.last_update_metrics
        summary = {
            "run": self.cfg.run.name,
            "steps": self.version,
            "policy_version": self.version,
            "samples": self.counters.samples,
            "reward_start": first.get("objective/scores"),
            "reward_end": last.get("objective/scores"),
            "kl_start": first.get("objective/kl"),
            "kl_end": last.get("objective/kl"),
            **self.throughput.summary(time.monotonic(), self.counters.samples),
            "checkpoint": path,
            "data_position": {"epoch": self.source.epoch, "position": self.source.position},
            "outstanding_prompts": self.in_flight() + list(self.source.returned),
            "placement": self.roles.placement,
            "error": error,
            **{k: v for k, v in self.counters.as_dict().items() if k != "samples"},
        }
        write_json(self.run_dir / "summary.json", summary)
        self.roles.metrics.finish(summary)
        return summary
