"""How a running job is reached from outside: `tame scale` through the run's named control
actor, and Ctrl-C or `ray job stop` through the driver's signal handlers. Both only leave
word for the loop, which acts on it between its turns."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from cluster.pool import ActorPool
from cluster.shared.config import TameConfig
from cluster.shared.errors import UserError
from cluster.shared.ray_cluster import connect_ray
from cluster.shared.resources import ask, free_on_cluster, roles
from cluster.state import Counters

NAMESPACE = "tame"
CONTROL_PREFIX = "tame-control-"


# --------------------------------------------------------------------------- `tame scale`


class Control:
    """A named actor through which `tame scale` reaches a running job."""

    def __init__(self, run: str, num_actors: int):
        self.run = run
        self.target = num_actors
        self.stopping = False
        self.by_user = False
        """A `tame scale` not yet seen by the loop: it turns rollout.autoscale off."""
        self.status: dict = {"run": run, "num_actors": num_actors}

    def request(self, num_actors: int, by_user: bool = True) -> dict:
        """Set the pool's size: `tame scale` (by the user), or the loop telling what it decided."""
        self.target = num_actors
        self.by_user = self.by_user or by_user
        return {"run": self.run, "num_actors": num_actors, "autoscale": self.status.get("autoscale")}

    def stop(self) -> None:
        """Finish the run early, as if its last update were reached: checkpoint and summary."""
        self.stopping = True

    def poll(self) -> tuple[int, bool, bool]:
        """(the size asked for, a stop asked for, whether a user asked for that size since the last poll)."""
        by_user, self.by_user = self.by_user, False
        return self.target, self.stopping, by_user

    def report(self, status: dict) -> None:
        self.status = status

    def get_status(self) -> dict:
        return self.status


def start_control(cfg: TameConfig) -> Any:
    """The run's control actor, named after the run, asking for `rollout.num_actors`."""
    import ray

    control = (
        ray.remote(num_cpus=0)(Control)
        .options(
            name=CONTROL_PREFIX + cfg.run.name,
            namespace=NAMESPACE,
            get_if_exists=True,
        )
        .remote(cfg.run.name, cfg.rollout.num_actors)
    )
    ray.get(control.request.remote(cfg.rollout.num_actors, by_user=False))
    return control


def status(
    cfg: TameConfig, pool: ActorPool, placement: dict, version: int, counters: Counters, autoscaler: Any = None
) -> dict:
    """What the loop reports to the control actor each second: `tame scale` and the tests read it."""
    scale = cfg.rollout.autoscale
    return {
        "autoscale": scale
        and {
            "on": autoscaler is not None,
            "min_actors": scale.min_actors,
            "max_actors": scale.max_actors,
            "last_decision": autoscaler.last.reason if autoscaler is not None and autoscaler.last else None,
        },
        "run": cfg.run.name,
        "num_actors": pool.target,
        "live_actors": len(pool),
        "policy_version": version,
        "counters": counters.as_dict(),
        "actors": {
            i: {**(placement["actors"].get(i) or {}), "version": s.version, "state": s.state.value}
            for i, s in pool.slots.items()
        },
        "pending": _pending_actors(cfg, pool),
        "learner": placement["learner"],
        "driver": placement["driver"],
    }


def _pending_actors(cfg: TameConfig, pool: ActorPool) -> str | None:
    """The actors not up yet and why they may wait, for `tame scale` and the status; None
    when every actor is up. The run goes on with the actors it has."""
    waiting = pool.pending_start()
    if not waiting:
        return None
    role = roles(cfg, only=("rollout",))[0]
    ids = ", ".join(str(s.actor_id) for s in waiting)
    return (
        f"{len(waiting)} rollout actor(s) not up yet ({ids}): each asks for {ask(role)}, and Ray places "
        f"it when a node has that free, then it builds its engine; {free_on_cluster(tuple(role.each))}"
    )


def ask_for_room(cfg: TameConfig, actors: int) -> None:
    """Tell Ray's autoscaler what the run needs with `actors` rollout actors (every role's
    bundles: the request is of the whole, not an increment). A cluster without an autoscaler
    ignores it; the actors that do not fit wait, and the run goes on with those that are up."""
    from ray.autoscaler.sdk import request_resources

    bundles = [dict(role.each) for role in roles(cfg) for _ in range(actors if role.name == "rollout" else role.count)]
    request_resources(bundles=[b for b in bundles if b])


def scale(num_actors: int | None, run: str | None = None, address: str | None = None) -> dict:
    """Ask the running job `run` (the only one when None) for `num_actors` rollout actors;
    None only reads its status (size, actors up, rollout.autoscale and its last decision)."""
    import ray

    # "auto": the running cluster of this machine; `tame scale` never starts one.
    given = address or os.environ.get("RAY_ADDRESS")
    try:
        connect_ray(given or "auto", namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    except ConnectionError:
        where = f"at {given}" if given else "on this machine (give one with --address or RAY_ADDRESS)"
        raise UserError(f"--address: no running Ray cluster {where} to scale a job on") from None
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].startswith(CONTROL_PREFIX)
    ]
    runs = [n.removeprefix(CONTROL_PREFIX) for n in names]
    if run is None:
        if len(runs) != 1:
            raise UserError(f"--run: {len(runs)} tame runs are running ({', '.join(runs) or 'none'}): name one")
        run = runs[0]
    if run not in runs:
        raise UserError(f"--run {run}: no such running tame job (running: {', '.join(runs) or 'none'})")
    control = ray.get_actor(CONTROL_PREFIX + run, namespace=NAMESPACE)
    if num_actors is None:
        return ray.get(control.get_status.remote())
    answer = ray.get(control.request.remote(num_actors))
    # The loop applies the request within a second and reports the actors not up yet.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        status = ray.get(control.get_status.remote())
        if status.get("num_actors") == num_actors and "pending" in status:
            return {**answer, "live_actors": status["live_actors"], "pending": status["pending"]}
        time.sleep(0.25)
    return answer


# --------------------------------------------------------------------------- signals


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


def stop_on_signals(stop: StopSignal) -> dict:
    """Ctrl-C (SIGINT) or `ray job stop` (SIGTERM) ask the loop to stop at its next safe point:
    the update in flight is finished, a checkpoint and the summary are written. A second
    signal stops at once, and so does the first while the run is still starting (nothing to
    checkpoint yet, and a start can wait long). Returns the handlers replaced (none outside
    the main thread), for `restore_signals`."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, _frame):
        if not stop.started or stop.name is not None:
            raise Interrupted(signum)
        stop.name, stop.signum = signal.Signals(signum).name, signum  # only flags: the loop acts on them

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
