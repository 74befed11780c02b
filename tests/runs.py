"""What the loop tests share: configs on the tiny assets, the ledger, and the prompt accounting."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from cluster.shared.config import TameConfig
from cluster.shared.config_file import load_config
from tests.conftest import REPO


def smoke_overrides(tiny_assets, out_dir: Path, prompts: Path | None = None) -> list[str]:
    """The `--set`s that point configs/smoke.yaml at the session's tiny assets and out_dir."""
    return [
        f"model.policy={tiny_assets.policy}",
        f"model.reward={tiny_assets.reward}",
        "model.build_assets=null",
        f"data.prompts={prompts or tiny_assets.data / 'prompts.jsonl'}",
        f"run.output_dir={out_dir}",
    ]


def smoke(tiny_assets, out_dir: Path, *overrides: str, prompts: Path | None = None) -> TameConfig:
    """configs/smoke.yaml on the session's tiny assets, writing under out_dir."""
    return load_config(REPO / "configs/smoke.yaml", [*smoke_overrides(tiny_assets, out_dir, prompts), *overrides])


# The metrics the design promises every update logs (../shared/DESIGN.md).
DESIGN_METRICS = [
    "objective/kl",
    "objective/entropy",
    "objective/scores",
    "objective/rlhf_reward",
    "objective/non_score_reward",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "val/ratio",
    "val/num_eos_tokens",
    "rollout/staleness_mean",
    "rollout/staleness_max",
    "rollout/behaviour_kl",
    "rollout/max_abs_logp_delta",
    "sync/version",
    "sync/bytes",
    "sync/publish_seconds",
    "perf/samples_per_s",
    "perf/learner_idle_share",
    "rollout/queue_depth",
]


# One prompt per generation slot and per update: every update trains on 8 whole prompts.
SMALL_BATCHES = (
    "rollout.prompts_per_batch=8",
    "train.rollout_batch_size=8",
    "ppo.minibatch_size=8",
    "ppo.micro_batch_size=8",
    "rollout.sampling.samples_per_prompt=1",
)


def few_prompts(tiny_assets, out_dir: Path, n: int = 24) -> Path:
    """The first n prompts of the tiny data, so a run goes through several epochs."""
    path = out_dir / "prompts.jsonl"
    lines = (tiny_assets.data / "prompts.jsonl").read_text().splitlines()[:n]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def ledger(run_dir: Path) -> list[dict]:
    path = run_dir / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_each_prompt_once(entries: list[dict], summary: dict, n_prompts: int) -> None:
    """No prompt trained twice, and every prompt of every finished epoch trained or still
    outstanding (handed out, queued or given back) at the end: nothing lost."""
    trained = [p for e in entries for p in e["prompts"]]
    assert len(trained) == len(set(trained)), "a prompt was trained on twice"
    outstanding = set(summary["outstanding_prompts"])
    assert not outstanding & set(trained), "a trained prompt is still outstanding"
    last_epoch = summary["data_position"]["epoch"]
    assert last_epoch >= 1, "the run did not finish an epoch"
    for epoch in range(last_epoch):
        seen = {p for p in trained + list(outstanding) if p.startswith(f"{epoch}:")}
        assert seen == {f"{epoch}:{i}" for i in range(n_prompts)}, f"prompts of epoch {epoch} lost"


def uninterrupted(cfg: TameConfig, updates: int, per_update: int) -> tuple[list[list[str]], dict]:
    """The prompts of each update, and the data position after them, of a synchronous run
    that nothing interrupted: consecutive takes from the prompt source."""
    from cluster.prompts import PromptSource
    from cluster.shared.data import load_prompts

    source = PromptSource(load_prompts(cfg.data.prompts), cfg.run.seed, cfg.data.shuffle)
    chunks = [[p.prompt_id for p in source.take(per_update)] for _ in range(updates)]
    return chunks, {"epoch": source.epoch, "position": source.position}


class Run(threading.Thread):
    """`tame train` in a thread of the test, watched through the run's control actor."""

    def __init__(self, cfg: TameConfig):
        super().__init__(daemon=True)
        self.cfg = cfg
        self.logs: list[str] = []
        self.summary: dict | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        from cluster.train import train

        try:
            self.summary = train(self.cfg, log=self.logs.append)
        except BaseException as e:  # the test asserts on it
            self.error = e

    def control(self):
        """The run's control actor, or None before it started and after the run ended."""
        import ray

        from cluster.control import CONTROL_PREFIX, NAMESPACE

        try:
            return ray.get_actor(CONTROL_PREFIX + self.cfg.run.name, namespace=NAMESPACE)
        except ValueError:
            return None

    def status(self) -> dict:
        """What the loop last reported: pool, versions, counters, placement with PIDs."""
        import ray

        control = self.control()
        return ray.get(control.get_status.remote()) if control else {}

    def stop(self, limit: float = 240) -> None:
        """Ask the loop to finish after the update in flight, as if it had reached its last
        one: final checkpoint and summary (`Control.stop`). A run still starting is asked as
        soon as its control actor is up; nothing when it has ended."""
        import ray

        deadline = time.monotonic() + limit
        while self.is_alive() and time.monotonic() < deadline:
            control = self.control()
            if control is None:
                time.sleep(0.2)
                continue
            try:
                ray.get(control.stop.remote())
            except ray.exceptions.RayActorError:  # the run ended meanwhile
                pass
            return

    def wait_for(self, what: str, predicate, limit: float = 240) -> dict:
        """Poll until predicate(status, ledger entries) holds; returns that status."""
        deadline = time.monotonic() + limit
        while self.is_alive() and time.monotonic() < deadline:
            status = self.status()
            if status.get("actors") and predicate(status, ledger(self.cfg.run_dir)):
                return status
            time.sleep(0.2)
        raise AssertionError(
            f"waited in vain for {what}; run alive: {self.is_alive()}, "
            f"error: {self.error!r}, last log lines: {self.logs[-5:]}"
        )


def trained_by(actor_id: int, entries: list[dict]) -> bool:
    return any(actor_id in e["actors"] for e in entries)
