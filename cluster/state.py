"""What the loop counts, and the driver's state a checkpoint carries so that a resumed run
trains every prompt exactly once and its counters go on where they stopped."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cluster.shared.errors import RunError


@dataclass
class Counters:
    """Run totals: in summary.json, the W&B metrics and `tame scale`'s status."""

    samples: int = 0
    """Samples trained on."""
    dropped_stale: int = 0
    """Samples dropped as older than max_staleness (an actor that fell behind)."""
    failed_prompts: int = 0
    """Prompts whose scoring failed: handed out again."""
    actor_failures: int = 0
    """Rollout actors that died: replaced unless rollout.replace_failed is false."""
    generate_timeouts: int = 0
    """Generation calls not answered within rollout.generate_timeout_s: that actor was
    handled as a dead one (its prompts handed out again, counted in actor_failures too)."""
    load_timeouts: int = 0
    """Weight loads not confirmed within rollout.load_timeout_s: that actor was replaced."""
    fingerprint_mismatches: int = 0
    """Weight loads whose probes did not match: that actor was replaced."""
    skipped_updates: int = 0
    """Updates skipped for NaN or Inf: their prompts were handed out again."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def metrics(self) -> dict[str, int]:
        """The counters logged with every update, by W&B name."""
        return {
            "rollout/dropped_stale": self.dropped_stale,
            "rollout/failed_prompts": self.failed_prompts,
            "rollout/actor_failures": self.actor_failures,
            "sync/fingerprint_mismatches": self.fingerprint_mismatches,
            "learner/skipped_updates": self.skipped_updates,
        }


@dataclass
class DriverState:
    """Saved with every checkpoint (by the learner, as plain data) and restored on resume."""

    source: dict
    """The prompt source's cursor, with the prompts handed out but not trained on
    (`PromptSource.state`)."""
    counters: Counters = field(default_factory=Counters)
    first_update_metrics: dict[str, float] = field(default_factory=dict)
    """The first update's metrics: the summary's reward and KL at the start."""

    def to_dict(self) -> dict:
        # "first": the key checkpoints have always been written with.
        return {"source": self.source, "counters": self.counters.as_dict(), "first": self.first_update_metrics}

    @classmethod
    def from_dict(cls, data: dict) -> DriverState:
        known = {f.name for f in fields(Counters)}
        counters = Counters(**{k: v for k, v in data["counters"].items() if k in known})
        return cls(source=data["source"], counters=counters, first_update_metrics=data.get("first", {}))


def append_ledger(path: Path, version: int, batch: list[Any]) -> None:
    """One line of ledger.jsonl: the prompts policy `version` was trained on (a batch of
    `cluster.pipeline.PromptGroup`), the versions that made them, the actors that did."""
    line = {
        "version": version,
        "prompts": [g.prompt_id for g in batch],
        "record_versions": [g.policy_version for g in batch],
        "actors": sorted({r.actor_id for g in batch for r in g.rollouts}),
    }
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")


@dataclass
class ScoringWatch:
    """Ends the run once generation calls that came back with nothing scored took
    `limit_s` (`reward.failing_timeout_s`) in all, with none scored in between: retrying cannot
    help a reward service that stays down or a rule function that fails on the same prompts
    each time they are handed out. Their own time counts: waiting for an update does not."""

    limit_s: float
    failing_s: float = 0.0
    last_failure: str = ""

    def after_call(self, batch: Any, call_seconds: float) -> None:
        """Account for one generation call's `RolloutBatch`; a RunError past the limit. A call
        in which no prompt ended scores nothing either way: its time counts only once calls
        have failed (the responses it stepped will be scored by a later one)."""
        if not batch.prompt_ids:
            if self.failing_s > 0:
                self._failed(call_seconds)
            return
        if batch.rollouts or not batch.failed_prompt_ids:
            self.failing_s = 0.0
            return
        self.last_failure = batch.score_error or "scores that are not finite numbers"
        self._failed(call_seconds)

    def _failed(self, seconds: float) -> None:
        self.failing_s += seconds
        if self.failing_s > self.limit_s:
            raise RunError(
                f"no generation call could be scored for {self.failing_s:.0f} s of calls "
                f"(reward.failing_timeout_s {self.limit_s:g}); the last failure: {self.last_failure}"
            )
