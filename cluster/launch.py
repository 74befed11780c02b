"""Starting a run's roles: the learner (and a sharded one's placement group), the first
rollout actors, the reward service (a Serve application of the run's own), the control actor
`tame scale` talks to, and the metric sinks; on `--resume`, the driver's state saved with the
newest checkpoint. `launch` returns them up, as one record (`Launched`), with the learner's
version published and the first actors loading it. `Loop` runs with that record.

The slow starts overlap: the learner's and the first actors' processes import torch and build
their models while Serve deploys the reward service, and one deadline covers them all
(`cluster.start_timeout_s`, with a word every 10 s on what is pending). A start that fails
(not up in time, a signal, an error) stops everything it started.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.control import NAMESPACE, start_control
from cluster.metrics import Metrics
from cluster.pool import ActorPool
from cluster.shared.config import TameConfig
from cluster.shared.errors import RunError, WorkerDiedError
from cluster.shared.files import write_text
from cluster.shared.ray_cluster import connect_ray, started_here
from cluster.shared.resources import ask, gpu_env, roles
from cluster.shared.startup import Pending, ref_done, wait_until_up
from cluster.shared.transport import WeightsHandle
from cluster.state import DriverState

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def connect(cfg: TameConfig, log: Callable[[str], None]) -> None:
    """Join the Ray cluster of `cluster.address` or RAY_ADDRESS, or start one here."""
    connect_ray(
        cfg.cluster.address,
        cfg.cluster.num_cpus,
        log,
        namespace=NAMESPACE,
        runtime_env={"env_vars": dict(ENGINE_ENV)},
        log_to_driver=False,
    )


# --------------------------------------------------------------------------- the roles


def rollout_actor_class(cfg: TameConfig):
    """`RolloutActor` as a Ray actor class with the resources and environment of cfg.rollout."""
    import ray

    from actors.rollout import RolloutActor

    r = cfg.rollout
    return ray.remote(
        num_cpus=r.num_cpus,
        num_gpus=r.num_gpus,
        resources=r.resources,
        runtime_env={"env_vars": {**ENGINE_ENV, **gpu_env(r.num_gpus)}},
    )(RolloutActor)


def learner_env(cfg: TameConfig) -> dict[str, str]:
    """The learner process's environment.

    `OMP_WAIT_POLICY=PASSIVE` when the learner runs more threads than it reserved while the
    actors generate beside it (max_staleness >= 1): its OpenMP threads sleep at barriers
    instead of spinning, so it borrows only the core time the actors leave idle. When the
    roles take turns (max_staleness 0) nothing runs beside it, and spinning is left on.

    `MALLOC_MMAP_THRESHOLD_` for a sharded learner on a CPU, which is there to save memory:
    its workers' glibc hands freed blocks of 256 KiB and more back to the system at once,
    instead of keeping in the heap the buffers FSDP2 gathers and frees for every unit; the
    price is a page fault per fresh page.

    What each costs and saves, measured: benchmarks/README.md (`loop.py --sweep-threads`,
    `sharded.py`)."""
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
    options = {
        "num_cpus": lc.num_cpus,
        "num_gpus": lc.num_gpus,
        "resources": lc.resources,
        "runtime_env": {"env_vars": {**learner_env(cfg), **gpu_env(lc.num_gpus)}},
    }
    if lc.num_workers == 1:
        from learner.learner import Learner

        return ray.remote(**options)(Learner).remote(cfg, str(cfg.run_dir)), None
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from learner.workers import LeadLearner

    bundle = {k: v for k, v in {"CPU": lc.num_cpus, "GPU": lc.num_gpus, **lc.resources}.items() if v > 0}
    group = placement_group([bundle] * lc.num_workers, strategy="PACK")
    placed = [
        {**options, "scheduling_strategy": PlacementGroupSchedulingStrategy(group, rank)}
        for rank in range(lc.num_workers)
    ]
    return ray.remote(LeadLearner).options(**placed[0]).remote(cfg, str(cfg.run_dir), placed[1:]), group


@dataclass(frozen=True)
class RemoteLearner:
    """The learner as the driver holds it: one actor handle whatever its number of workers,
    and the placement group a sharded one's workers live in, which outlives the handles."""

    handle: Any
    group: Any | None
    run_dir: Path

    def get(self, ref):
        """`ray.get` of a learner call; a RunError when the learner or one of its workers died."""
        import ray

        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, WorkerDiedError) as e:
            raise self.died(e) from e

    def died(self, e: Exception) -> RunError:
        """The error that ends a run whose learner (or one of its workers) died in any call."""
        import ray

        what = e.cause if isinstance(e, ray.exceptions.RayTaskError) else type(e).__name__
        return RunError(
            f"the learner died ({what}); resume with `tame train --resume`: {newest_checkpoint(self.run_dir)}"
        )

    def stop(self) -> None:
        """Kill the learner (a sharded one's workers die with their rank 0) and free its
        placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        ray.kill(self.handle)
        if self.group is not None:
            remove_placement_group(self.group)


def node_of(actor: Any) -> dict:
    """The Ray node an actor landed on, and its process id."""
    import ray

    return ray.get(
        actor.__ray_call__.remote(lambda _self: {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()})
    )


def newest_checkpoint(run_dir: Path) -> str:
    """Where to resume from, said only when there is a checkpoint to resume from."""
    from learner.checkpoints import complete

    saved = complete(run_dir)
    return f"the newest complete checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"


def reward_app(cfg: TameConfig) -> str:
    """The run's own Serve application: runs sharing a cluster (and `tame serve-reward`, whose
    application is "tame-reward") never score with each other's reward model."""
    return f"tame-reward-{cfg.run.name}"


def delete_reward_app(cfg: TameConfig) -> None:
    """The run's reward app, the one part that would outlive the driver (at the end of a run,
    and after a failed start)."""
    from ray import serve

    try:
        serve.delete(reward_app(cfg))
    except Exception:  # Serve never started, or is gone with the cluster
        pass


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return any(
        a["name"] == SERVE_CONTROLLER_NAME and a["namespace"] == SERVE_NAMESPACE
        for a in ray.util.list_named_actors(all_namespaces=True)
    )


# --------------------------------------------------------------------------- the launch


@dataclass(frozen=True)
class Launched:
    """Every role of a run, up: what `launch` returns and `Loop` runs with."""

    cfg: TameConfig
    learner: RemoteLearner
    pool: ActorPool
    """The first rollout actors, each loading `weights` first."""
    scorer: Any
    """The `RewardClient` of the run's reward app; each actor scores through it."""
    control: Any
    """The run's named `Control` actor (`tame scale`)."""
    metrics: Metrics
    placement: dict
    """Where each role landed (node, process), for summary.json and the status."""
    weights: WeightsHandle
    """The learner's version at the start (0, or the resumed checkpoint's), published."""
    restored: DriverState | None
    """The driver's state saved with the checkpoint resumed from; None for a fresh start."""
    owns_serve: bool
    """Serve was started by this run, so it is stopped with it (unless another app runs on it)."""

    def shutdown(self) -> None:
        """Stop every process the run started."""
        import ray
        from ray import serve

        for slot in list(self.pool.slots.values()):
            ray.kill(slot.handle)
        self.learner.stop()
        ray.kill(self.control)
        if started_here():
            return  # this process's own Ray: Serve stops with it when the process exits
        delete_reward_app(self.cfg)
        try:  # Serve this run started goes with it, unless another run or service deploys on it now
            if self.owns_serve and not serve.status().applications:
                serve.shutdown()
        except Exception:  # Serve may already be gone with a dying cluster
            pass


def prepare_run_dir(cfg: TameConfig, resume: bool) -> None:
    """The run directory with the resolved config.yaml; a fresh run drops what a previous run
    of the same name left there (a resumed one keeps it: `truncate_jsonl`)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
    if not resume:
        for stale in ("ledger.jsonl", "metrics.jsonl", "summary.json", "wandb_id"):
            (cfg.run_dir / stale).unlink(missing_ok=True)


def launch(cfg: TameConfig, resume: bool, log: Callable[[str], None]) -> Launched:
    """Start every role of the run and wait until each is up (within
    `cluster.start_timeout_s`); on `resume`, restore the newest checkpoint. If anything fails
    on the way (a signal included), what was started is stopped before the error is raised."""
    import ray

    from reward_service.client import RewardClient
    from reward_service.service import coming_up, deploy

    actor_cls = rollout_actor_class(cfg)
    pool = ActorPool(lambda actor_id, scorer: actor_cls.remote(cfg, actor_id, scorer), cfg.rollout.num_actors)
    log(f"starting the learner and {pool.target} rollout actor(s)")
    learner = RemoteLearner(*start_learner(cfg), cfg.run_dir)
    early: list = []
    control = metrics = None
    try:
        # The actors' processes build their engines while Serve deploys; they get the scorer later.
        early.extend(pool.create(scorer=None) for _ in range(pool.target))
        # A Serve instance this run starts is stopped with it, so a later deployment on the
        # same cluster starts Serve afresh with its own HTTP options.
        owns_serve = not _serve_running()
        log(f"starting the reward service ({cfg.reward.replicas} replica(s))")
        scorer = RewardClient(
            deploy(cfg, http=False, name=reward_app(cfg), wait=False),
            cfg.reward.timeout_s,
            cfg.reward.retries,
            cfg.reward.call_items_per_s,
            with_spread=True,  # each rollout's reward_std: the ensemble's spread metric
        )
        learner_role, rollout_role = roles(cfg, only=("learner", "rollout"))
        roles_up = [
            Pending(
                "the learner",
                ask(learner_role),
                ref_done(learner.handle.__ray_ready__.remote()),
                tuple(learner_role.each),
            ),
            *(
                Pending(
                    f"rollout actor {actor_id}",
                    ask(rollout_role),
                    ref_done(handle.__ray_ready__.remote()),
                    tuple(rollout_role.each),
                )
                for actor_id, handle in early
            ),
            coming_up(cfg, reward_app(cfg)),
        ]
        metrics = Metrics(cfg, cfg.run_dir, log)  # W&B starts while the roles do
        wait_until_up(roles_up, cfg.cluster.start_timeout_s, log)
        workers = ray.get(learner.handle.places.remote())
        placement = {
            "learner": {**workers[0], "workers": workers},
            "actors": {},
            "driver": {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()},
        }

        restored = _restore(cfg, learner, log) if resume else None
        weights: WeightsHandle = learner.get(learner.handle.publish.remote())  # later ones come with each update

        control = start_control(cfg)
        for actor_id, handle in early:  # each loads the published version before it generates
            handle.set_scorer.remote(scorer)
            pool.add(actor_id, handle, weights)
    except BaseException:  # not up in time, a signal, or a failed start: stop what was started
        for _, handle in early:
            ray.kill(handle)
        if control is not None:
            ray.kill(control)
        if metrics is not None:
            metrics.finish({"error": "the run did not start"})
        learner.stop()  # and free its placement group, which outlives handles
        delete_reward_app(cfg)
        raise
    return Launched(cfg, learner, pool, scorer, control, metrics, placement, weights, restored, owns_serve)


def _restore(cfg: TameConfig, learner: RemoteLearner, log: Callable[[str], None]) -> DriverState | None:
    """Load the newest checkpoint into the learner and return the driver's state saved with it
    (None when there is none yet). The lines of metrics.jsonl and ledger.jsonl written after it
    go: the resumed run redoes those updates."""
    import ray

    saved = ray.get(learner.handle.load_checkpoint.remote())
    version = ray.get(learner.handle.version.remote())
    truncate_jsonl(cfg.run_dir / "ledger.jsonl", "version", version)
    truncate_jsonl(cfg.run_dir / "metrics.jsonl", "step", version)
    log(f"resumed at policy version {version}" if saved else "no checkpoint yet: starting fresh")
    return DriverState.from_dict(saved) if saved else None


def truncate_jsonl(path: Path, key: str, last: int) -> None:
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
