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
from cluster.shared.errors import WorkerDiedError
from learner.learner import Learner
from learner.sharding import Rank, rendezvous_address


class LeadLearner(Learner):
    def __init__(self, cfg: TameConfig, run_dir: str, worker_options: list[dict[str, Any]]):
        """`worker_options`: the Ray actor options of ranks 1 .. N-1 (resources, placement)."""
        import ray

        world = len(worker_options) + 1
        address = rendezvous_address()
        self.workers = [
            ray.remote(Learner).options(**options).remote(cfg, run_dir, Rank(rank, world, address))
            for rank, options in enumerate(worker_options, start=1)
        ]
        self.broken: str | None = None  # why the workers were stopped, if they were
        super().__init__(cfg, run_dir, Rank(0, world, address))  # returns once every worker joined

    def _on_all(self, method: str, *args: Any) -> Any:
        """Call `method` on every worker and on this one; rank 0's result (all agree). A
        worker that died is a `WorkerDiedError`. A failure that leaves the workers out of step
        (one of them still inside a collective the others left) stops them: every later call
        fails at once instead of pairing with a stale collective."""
        import ray

        if self.broken:
            raise WorkerDiedError(f"the learner's workers were stopped after {self.broken}")
        calls = {getattr(worker, method).remote(*args): rank for rank, worker in enumerate(self.workers, start=1)}
        try:
            mine = getattr(super(), method)(*args)
        except Exception as e:
            # A dead worker breaks rank 0's collective first: name it rather than the broken
            # connection. Workers that raised the same error as rank 0 are still in step.
            done, stuck = ray.wait(list(calls), num_returns=len(calls), timeout=10)
            for ref in done:
                self._check_alive(ref, calls[ref])
            if stuck:
                self._stop_workers(f"{method} failed on rank 0 ({type(e).__name__})")
            raise
        for ref, rank in calls.items():
            self._check_alive(ref, rank, raise_errors=True)
        return mine

    def _check_alive(self, ref, rank: int, raise_errors: bool = False) -> None:
        """Wait for a worker's call: a dead worker is a WorkerDiedError; its own error is
        raised when `raise_errors` (rank 0 succeeded, so the workers are out of step)."""
        import ray

        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._stop_workers(f"worker {rank} died")
            raise WorkerDiedError(f"learner worker {rank} of {len(self.workers) + 1} died ({type(e).__name__})") from e
        except Exception:
            if raise_errors:
                self._stop_workers(f"an error on worker {rank}")
                raise

    def _stop_workers(self, why: str) -> None:
        import ray

        self.broken = why
        for worker in self.workers:
            ray.kill(worker)

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

    def wait_for_checkpoint(self):
        return self._on_all("wait_for_checkpoint")

    def load_checkpoint(self, path=None):
        return self._on_all("load_checkpoint", path)

    def places(self) -> list[dict]:
        """The Ray node and process of each worker, rank 0 first."""
        import ray

        return [self.place(), *ray.get([w.place.remote() for w in self.workers])]
