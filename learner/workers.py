"""A sharded learner as one Ray actor: `LeadLearner` is rank 0 of `learner.num_workers`.

The controller holds one learner handle whatever the number of workers. Rank 0 starts the
other workers as Ray actors of its own (in the bundles of the placement group the controller
made, so they die with it), and passes every call that makes passes over the models on to
them before making its own: each pass gathers the layers from all workers
(`learner/sharding.py`). A worker that dies breaks rank 0's next collective, so the call
fails and the run ends as for a dead learner; a hung one trips the group's timeout.
"""

from __future__ import annotations

from typing import Any

from cluster.shared.config import TameConfig
from learner.learner import Learner
from learner.sharding import Group, rendezvous_address


class WorkerDiedError(RuntimeError):
    """A worker of a sharded learner died: the learner cannot go on."""


class LeadLearner(Learner):
    def __init__(self, cfg: TameConfig, run_dir: str, worker_options: list[dict[str, Any]]):
        """`worker_options`: the Ray actor options of ranks 1 .. N-1 (resources, placement)."""
        import ray

        world = len(worker_options) + 1
        address = rendezvous_address()
        self.workers = [ray.remote(Learner).options(**options).remote(cfg, run_dir, Group(rank, world, address))
                        for rank, options in enumerate(worker_options, start=1)]
        super().__init__(cfg, run_dir, Group(0, world, address))  # returns once every worker joined

    def _on_all(self, method: str, *args: Any) -> Any:
        """Call `method` on every worker and on this one; rank 0's result (all agree). A
        worker that died is a `WorkerDiedError`."""
        import ray

        pending = {getattr(worker, method).remote(*args): rank for rank, worker in enumerate(self.workers, start=1)}
        try:
            mine = getattr(super(), method)(*args)
        except Exception:
            # A dead worker breaks this worker's collective first: name it rather than the
            # broken connection.
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=10)
            self._raise_if_dead({ref: pending[ref] for ref in ready})
            raise
        self._raise_if_dead(pending)  # and a worker's own error, if it had one
        return mine

    def _raise_if_dead(self, ranks: dict) -> None:
        """Get each call ({ref: the worker's rank}); a dead worker is a WorkerDiedError."""
        import ray

        for ref, rank in ranks.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                raise WorkerDiedError(f"learner worker {rank} of {len(self.workers) + 1} died "
                                      f"({type(e).__name__})") from e

    def update(self, rollouts):
        return self._on_all("update", rollouts)

    def prepare(self, rollouts):
        return self._on_all("prepare", rollouts)

    def publish(self):
        return self._on_all("publish")

    def logprobs(self, rollouts):
        return self._on_all("logprobs", rollouts)

    def save_checkpoint(self, driver_state):
        return self._on_all("save_checkpoint", driver_state)

    def load_checkpoint(self, path=None):
        return self._on_all("load_checkpoint", path)

    def places(self) -> list[dict]:
        """The Ray node and process of each worker, rank 0 first."""
        import ray

        return [self.place(), *ray.get([w.place.remote() for w in self.workers])]
