"""Where a run's figures go: wandb (online, offline or disabled), `metrics.jsonl` in the run
directory, and one console line per update; and the throughput figures the loop keeps."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cluster.shared.config import TameConfig
from cluster.shared.records import LoadResult, Rollout, RolloutBatch

CONSOLE_KEYS = [
    ("objective/scores", "reward", "{:+.3f}"),
    ("objective/kl", "kl", "{:.3f}"),
    ("loss/policy_avg", "pg", "{:+.3f}"),
    ("rollout/staleness_mean", "stale", "{:.2f}"),
    ("perf/samples_per_s", "samples/s", "{:.1f}"),
]


def wandb_mode(cfg: TameConfig) -> str:
    mode = cfg.logging.wandb.mode
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class Metrics:
    """One run's metric sinks. Resuming a run reopens the same wandb run (its id is kept in
    the run directory)."""

    def __init__(self, cfg: TameConfig, run_dir: Path, log: Callable[[str], None]):
        self.cfg = cfg
        self.run_dir = run_dir
        self.log = log
        self.history = run_dir / "metrics.jsonl"
        self.mode = wandb_mode(cfg)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            id_file.write_text(f"{cfg.run.name}-{uuid.uuid4().hex[:8]}\n")
        w = cfg.logging.wandb
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=cfg.run.name,
            tags=w.tags,
            id=id_file.read_text().strip(),
            resume="allow",
            dir=str(run_dir),
            mode=self.mode,
            config=cfg.model_dump(mode="json"),
            settings=wandb.Settings(console="off", quiet=True),
        )
        self.log(f"wandb {self.mode} run {self.run.id} in {run_dir / 'wandb'}")

    def step(self, step: int, metrics: dict[str, float], total: int) -> None:
        # Figures are floats; a few are text (`rollout/autoscale_reason`), kept as they are.
        clean = {k: v if isinstance(v, str) else float(v) for k, v in metrics.items() if v is not None}
        finite = {k: v if isinstance(v, str) or math.isfinite(v) else str(v) for k, v in clean.items()}
        with self.history.open("a") as f:
            f.write(json.dumps({"step": step, **finite}) + "\n")
        self._to_wandb(lambda run: run.log(clean, step=step))
        shown = "  ".join(f"{label} {fmt.format(clean[k])}" for k, label, fmt in CONSOLE_KEYS if k in clean)
        self.log(f"update {step}/{total}  {shown}")

    def samples(self, step: int, rollouts: list[Rollout]) -> None:
        """A table of sample completions (prompt, response, reward, policy version)."""
        if self.run is None or not rollouts:
            return
        import wandb

        columns = ["prompt", "response", "reward", "policy_version"]
        rows = [[r.prompt_text, r.response_text, r.score, r.policy_version] for r in rollouts]
        table = wandb.Table(columns=columns, data=rows)
        self._to_wandb(lambda run: run.log({"samples": table}, step=step))

    def finish(self, summary: dict) -> None:
        def close(run) -> None:
            for k, v in summary.items():
                if isinstance(v, (int, float)):
                    run.summary[k] = v
            run.finish()

        self._to_wandb(close)

    def _to_wandb(self, write: Callable) -> None:
        """A failing wandb (its service killed, a network outage) must not stop the run: say so
        once and carry on with metrics.jsonl, which has every step."""
        if self.run is None:
            return
        try:
            write(self.run)
        except Exception as e:
            self.run = None
            self.log(f"wandb stopped working ({type(e).__name__}: {e}); metrics go on to {self.history}")


def load_figures(loads: Iterable[LoadResult]) -> dict[str, float]:
    """The slowest and least exact of the actors' last weight loads."""
    loads = list(loads)
    return {
        "sync/load_seconds_max": max((r.seconds for r in loads), default=0.0),
        "sync/verify_seconds_max": max((r.verify_seconds for r in loads), default=0.0),
        "sync/probe_rms_error_max": max((r.probe_rms_error for r in loads), default=0.0),
    }


def reward_spread(rollouts: list[Rollout]) -> dict[str, float]:
    """`objective/reward_std`: the mean over the update's samples of how far the reward
    models of an ensemble disagree on each (the population std of their scores; 0 with one
    model, and for a sample whose scorer did not say). A spread that grows while the reward
    climbs is the policy finding what the members do not agree on: over-optimisation."""
    spreads = [r.reward_std or 0.0 for r in rollouts]
    return {"objective/reward_std": sum(spreads) / max(len(spreads), 1)}


def version_spans(rollouts: list[Rollout]) -> dict[str, float]:
    """How many policy versions made each sample's tokens (weights load while responses are
    in flight): `rollout/spanning_share`, the share made by more than one, and
    `rollout/versions_per_sample`, their mean count."""
    counts = [len(set(r.token_versions)) if r.token_versions else 1 for r in rollouts]
    n = max(len(counts), 1)
    return {"rollout/spanning_share": sum(c > 1 for c in counts) / n, "rollout/versions_per_sample": sum(counts) / n}


@dataclass
class Generated:
    """What the actors' generation calls of one interval between updates cost."""

    samples: int = 0
    tokens: int = 0
    generate_seconds: float = 0.0
    score_seconds: float = 0.0
    reference_seconds: float = 0.0
    engine_steps: int = 0
    engine_sequences: int = 0

    def add(self, batch: RolloutBatch) -> None:
        self.samples += len(batch.rollouts)
        self.tokens += batch.generated_tokens
        self.engine_steps += batch.engine_steps
        self.engine_sequences += batch.engine_sequences
        self.generate_seconds += batch.generate_seconds
        self.score_seconds += batch.score_seconds
        self.reference_seconds += batch.reference_seconds


class Throughput:
    """The run's speed: its start-up (from `tame train` to the first generation call: roles
    up, weights loaded), samples per second from the end of the first update (after the
    engines warmed up and the pipeline filled), and per interval between updates how much of
    it the learner sat idle and what a sample cost the actors."""

    def __init__(self, created: float):
        self.created = created
        """When `tame train` began: start-up and the whole wall time count from here."""
        self.started = time.monotonic()
        """When the loop began: the rate until the first update ends counts from here."""
        self.startup_seconds: float | None = None
        self.rate_from: tuple[float, int] | None = None
        """(time, samples) at the first update's end."""
        self.generated = Generated()
        """Within the interval."""

    def generation_starts(self) -> None:
        if self.startup_seconds is None:
            self.startup_seconds = time.monotonic() - self.created

    def samples_per_s(self, now: float, samples: int) -> float:
        """Training throughput from the end of the first update; until then, from the loop's start."""
        if self.rate_from is None or samples == self.rate_from[1]:
            return samples / max(now - self.started, 1e-9)
        return (samples - self.rate_from[1]) / max(now - self.rate_from[0], 1e-9)

    def summary(self, now: float, samples: int) -> dict[str, float | None]:
        """The summary's figures of speed, at the end of the run."""
        wall = now - self.created
        return {
            "wall_seconds": wall,
            "startup_seconds": self.startup_seconds,
            "samples_per_second": self.samples_per_s(now, samples),
            "samples_per_second_overall": samples / max(wall, 1e-9),
        }

    def update_ended(
        self, now: float, samples: int, interval_start: float, update_started: float, actor_idle_share: float
    ) -> dict[str, float]:
        """The perf/* figures of the interval that the update just ended closes. The learner's
        idle share is the time before this update started."""
        interval = max(now - interval_start, 1e-9)
        generated, self.generated = self.generated, Generated()
        if self.rate_from is None:
            self.rate_from = (now, samples)
        per_sample = max(generated.samples, 1)
        return {
            "perf/step_seconds": interval,
            "perf/update_seconds_wall": now - update_started,
            "perf/samples": samples,
            "perf/samples_per_s": self.samples_per_s(now, samples),
            "perf/learner_idle_share": max(0.0, update_started - interval_start) / interval,
            "perf/actor_idle_share": actor_idle_share,
            # What one sample cost the actors in this interval: the pipeline's other side.
            "perf/generate_seconds_per_sample": generated.generate_seconds / per_sample,
            "perf/score_seconds_per_sample": generated.score_seconds / per_sample,
            "perf/reference_seconds_per_sample": generated.reference_seconds / per_sample,
            # The pool's generation: tokens of the prompts that ended in the interval, and how
            # many sequences an engine step ran on average (its occupancy).
            "rollout/tokens_per_s": generated.tokens / interval,
            "rollout/engine_occupancy": generated.engine_sequences / max(generated.engine_steps, 1),
        }
