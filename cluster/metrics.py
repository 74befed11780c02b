"""Where a run's figures go: wandb (online, offline or disabled), `metrics.jsonl` in the run
directory, and one console line per update."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Callable

from cluster.shared.config import TameConfig

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
            project=w.project, entity=w.entity, name=cfg.run.name, tags=w.tags,
            id=id_file.read_text().strip(), resume="allow", dir=str(run_dir), mode=self.mode,
            config=cfg.model_dump(mode="json"), settings=wandb.Settings(console="off", quiet=True),
        )
        self.log(f"wandb {self.mode} run {self.run.id} in {run_dir / 'wandb'}")

    def step(self, step: int, metrics: dict[str, float], total: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        with self.history.open("a") as f:
            f.write(json.dumps({"step": step, **{k: (v if math.isfinite(v) else str(v))
                                                  for k, v in clean.items()}}) + "\n")
        self._to_wandb(lambda run: run.log(clean, step=step))
        shown = "  ".join(f"{label} {fmt.format(clean[k])}" for k, label, fmt in CONSOLE_KEYS if k in clean)
        self.log(f"update {step}/{total}  {shown}")

    def samples(self, step: int, rows: list[dict]) -> None:
        """A table of sample completions (prompt, response, reward, policy version)."""
        if self.run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
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
