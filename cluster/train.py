"""`tame train`: check the inputs (`cluster.checks`), connect to Ray, launch the roles
(`cluster.launch`), run the actor-learner loop (`cluster.controller.Loop`), finish."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from cluster.checks import check_start
from cluster.control import Interrupted, StopSignal, restore_signals, stop_on_signals
from cluster.controller import Loop
from cluster.launch import connect, launch, newest_checkpoint, prepare_run_dir
from cluster.shared.config import TameConfig
from cluster.shared.errors import RunError
from cluster.shared.records import Rollout
from cluster.shared.resources import check_cluster


def train(
    cfg: TameConfig,
    resume: bool = False,
    log: Callable[[str], None] = print,
    judge: Callable[[list[Rollout]], dict] | None = None,
) -> dict:
    """Run PPO with the actor-learner loop until the configured number of updates.

    Ctrl-C or SIGTERM stops at the next safe point and raises KeyboardInterrupt after the
    final checkpoint; a failure raises after it (RunError when the run cannot go on)."""
    created = time.monotonic()
    run_dir = cfg.run_dir
    # 1. check what can be checked before Ray starts; the tokenizer's checks run meanwhile
    tokenizers = check_start(cfg, resume, log)
    # 2. connect (or start a local Ray), then refuse a run that can never be placed
    connect(cfg, log)
    check_cluster(cfg)
    tokenizers.check()
    log(f"run {cfg.run.name} in {run_dir} (tame's code from {Path(__file__).resolve().parents[1]})")
    prepare_run_dir(cfg, resume)
    stop = StopSignal()
    previous = stop_on_signals(stop)

    def log_stage(message: str) -> None:  # what the start is busy with, for a signal's message
        stop.stage = message
        log(message)

    roles = loop = None
    try:
        # 3. launch every role (it stops what it started if it fails), 4. run the loop
        roles = launch(cfg, resume, log_stage)
        loop = Loop(cfg, roles, log, judge, stop, created)
        summary = loop.run()
    except KeyboardInterrupt:  # a signal while starting, or a second one: stop now
        if not stop.started:
            log(f"stopped while starting ({stop.stage}); nothing was trained")
        else:
            log(f"stopped at once; {newest_checkpoint(run_dir)}")
        raise
    except Exception as e:  # the run cannot go on: save what was trained
        if loop is None:
            raise  # it failed to start
        why = str(e) if isinstance(e, RunError) else f"{type(e).__name__}: {e}"
        summary = loop.finish(error=why)
        log(f"{why}; " + _where_saved(summary, run_dir))
        raise
    finally:
        restore_signals(previous)
        if roles is not None:
            roles.shutdown()  # every process the run started
    # 5. finish: say where it ended
    if summary["error"]:
        log(f"{summary['error']}; " + _where_saved(summary, run_dir))
        raise Interrupted(stop.signum)
    log(
        f"done: {summary['steps']} updates, {summary['samples']} samples in {summary['wall_seconds']:.0f}s, "
        f"{summary['startup_seconds'] or 0:.0f}s of it starting up; {summary['samples_per_second']:.1f} samples/s "
        f"after the first update; summary in {run_dir / 'summary.json'}"
    )
    return summary


def _where_saved(summary: dict, run_dir: Path) -> str:
    if summary["checkpoint"]:
        return f"checkpoint at version {summary['steps']} in {summary['checkpoint']}"
    return f"no new checkpoint; {newest_checkpoint(run_dir)}"
