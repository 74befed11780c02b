"""The actor-learner loop end to end on CPU: real Ray, vLLM actors, a Serve reward
deployment, the learner, and wandb offline read back from its run file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from tests.runs import (
    SMALL_BATCHES,
    Run,
    assert_each_prompt_once,
    few_prompts,
    ledger,
    smoke,
    smoke_overrides,
    trained_by,
)
from tests.support import process


def test_the_pool_shrinks_grows_and_fails_cleanly_counting_every_prompt_once(tiny_assets, ray_local, tmp_path):
    """Two actors with rollout.replace_failed false: one killed (the run carries on with the
    other), `tame scale` up and down (the removed actor drains), then the last one killed:
    the run stops with a clear error, a final checkpoint and summary, and no process left.
    Its checkpoints are written in the background (learner.async_checkpoints): the summary is
    written once the final one is complete, and nothing half-written is left."""
    import ray

    from cluster.control import CONTROL_PREFIX, NAMESPACE
    from cluster.shared.errors import RunError
    from learner.checkpoints import STATE_FILE, complete

    run = Run(
        smoke(
            tiny_assets,
            tmp_path,
            "run.name=pool",
            "rollout.num_actors=2",
            "rollout.replace_failed=false",
            "train.max_staleness=1",
            "train.total_updates=10000",
            "learner.async_checkpoints=true",
            *SMALL_BATCHES,
            prompts=few_prompts(tiny_assets, tmp_path),
        )
    )
    address = ray.get_runtime_context().gcs_address

    def tame_scale(n):
        out = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "scale", "--actors", str(n), "--run", "pool", "--address", address],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout + out.stderr

    def last_by(actors, n=3):
        return lambda s, e: len(e) > n and all(x["actors"] == actors for x in e[-n:])

    # One of two actors dies: no replacement, the other carries the run.
    status = run.wait_for(
        "both actors training",
        lambda s, e: trained_by(0, e) and trained_by(1, e) and all("pid" in a for a in s["actors"].values()),
    )
    pids = {i: a["pid"] for i, a in status["actors"].items()}
    # Roles that ask Ray for no GPU see none (Ray 2.60 no longer hides them itself).
    for pid in (status["learner"]["pid"], *pids.values()):
        assert psutil.Process(pid).environ().get("CUDA_VISIBLE_DEVICES") == "", pid
    os.kill(pids[1], signal.SIGKILL)
    status = run.wait_for("the pool to shrink to one", lambda s, e: s["num_actors"] == 1 and last_by([0])(s, e))
    assert list(status["actors"]) == [0]
    # Grown through the real CLI: a new actor (id 2) trains; shrunk again: it drains.
    said = tame_scale(2)  # the new actor is still building its engine: the answer says so
    assert (
        "rollout pool resized to 2 actors; 1 rollout actor(s) not up yet (2): each asks for rollout.num_cpus 1" in said
        and "free on the cluster: " in said
    ), said
    status = run.wait_for("the new actor training", lambda s, e: trained_by(2, e) and "pid" in s["actors"].get(2, {}))
    pids[2] = status["actors"][2]["pid"]
    learner = status["learner"]["pid"]
    tame_scale(1)
    run.wait_for("the pool back to one", lambda s, e: list(s["actors"]) == [0] and last_by([0])(s, e))
    # The last actor dies: the run cannot go on, and says so.
    os.kill(pids[0], signal.SIGKILL)
    run.join(timeout=300)
    assert not run.is_alive() and isinstance(run.error, RunError), run.error
    assert "the last rollout actor died and rollout.replace_failed is false" in str(run.error)

    summary = json.loads((run.cfg.run_dir / "summary.json").read_text())
    entries = ledger(run.cfg.run_dir)
    assert summary["error"] == str(run.error) and summary["actor_failures"] == 2
    assert summary["steps"] == entries[-1]["version"]
    assert summary["checkpoint"].endswith(f"version-{summary['steps']:06d}")
    assert (Path(summary["checkpoint"]) / "trainer_state.pt").is_file()
    written = (Path(summary["checkpoint"]) / STATE_FILE).stat().st_mtime_ns
    assert written <= (run.cfg.run_dir / "summary.json").stat().st_mtime_ns
    kept = complete(run.cfg.run_dir)
    assert kept[-1] == Path(summary["checkpoint"]) and len(kept) == 2
    assert sorted(p.name for p in (run.cfg.run_dir / "checkpoints").iterdir()) == [p.name for p in kept]
    assert all(e["version"] - 1 - v <= 1 for e in entries for v in e["record_versions"])
    assert_each_prompt_once(entries, summary, 24)

    # Nothing of the run is left: learner and actor processes, the control actor.
    gone = psutil.wait_procs([p for p in map(process, [learner, *pids.values()]) if p], timeout=60)[1]
    assert not gone, [p.pid for p in gone]
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
    assert CONTROL_PREFIX + "pool" not in names


def test_scale_without_a_running_job_is_a_usage_error(ray_local):
    address = ray_local.get_runtime_context().gcs_address
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "scale", "--actors", "2", "--run", "nope", "--address", address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--run nope: no such running tame job" in out.stderr


@pytest.mark.parametrize("count", ["-1", "1025"])
def test_scale_to_an_impossible_count_is_a_usage_error(count):
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "scale", "--actors", count], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert f"--actors {count}: the pool size must be between 0 and 1024" in out.stderr


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("model.policy=/does/not/exist", "model.policy: /does/not/exist is not a Hugging Face causal LM folder"),
        ("data.prompts=/does/not/exist.jsonl", "/does/not/exist.jsonl: data file not found"),
        ("model.reward={policy}", "model.reward: {policy} holds a LlamaForCausalLM, not a reward model"),
    ],
)
def test_bad_inputs_exit_2_before_ray(tiny_assets, tmp_path, bad, needle):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "train",
            "--config",
            str(REPO / "configs/smoke.yaml"),
            "--set",
            "model.build_assets=null",
            "--set",
            f"model.reward={tiny_assets.reward}",
            "--set",
            f"model.policy={tiny_assets.policy}",
            "--set",
            f"data.prompts={tiny_assets.data / 'prompts.jsonl'}",
            "--set",
            f"run.output_dir={tmp_path}",
            "--set",
            bad.format(policy=tiny_assets.policy),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert needle.format(policy=tiny_assets.policy) in out.stderr
    assert not (tmp_path / "smoke").exists()  # nothing half-written


# --------------------------------------------------------------------------- starting


def test_what_a_run_needs_is_summed_and_compared_with_the_cluster():
    from cluster.shared.config_file import load_config
    from cluster.shared.errors import UserError
    from cluster.shared.resources import check_fits

    cfg = load_config(REPO / "configs/smoke.yaml")  # learner 1 CPU, 1 actor x 1 CPU, 1 replica x 0.5 CPU
    check_fits(cfg, {"CPU": 2.5}, [{"CPU": 2.5}])
    with pytest.raises(UserError) as err:
        check_fits(cfg, {"CPU": 2.0}, [{"CPU": 2.0}])
    assert (
        "the run needs 2.5 CPU: learner.num_cpus 1 + rollout.num_actors 1 x rollout.num_cpus 1 + "
        "reward.replicas 1 x reward.num_cpus 0.5; the cluster has 2"
    ) in str(err.value)
    assert "cluster.check_resources: false" in str(err.value)
    # Enough in total, but one actor needs more than any single node has.
    wide = load_config(REPO / "configs/smoke.yaml", ["learner.num_cpus=3", "learner.resources={gpu_box: 1}"])
    with pytest.raises(UserError) as err:
        check_fits(wide, {"CPU": 8.0}, [{"CPU": 4.0}, {"CPU": 4.0}])
    assert "learner.num_cpus 3 CPU" not in str(err.value)  # 3 of 4 fits a node
    assert "learner.resources.gpu_box 1 gpu_box: no node has that much (the largest has 0)" in str(err.value)
    assert "the run needs 1 gpu_box: learner.resources.gpu_box 1; the cluster has 0" in str(err.value)
    # A sharded learner asks for its resources once per worker.
    with pytest.raises(UserError) as err:
        check_fits(load_config(REPO / "configs/smoke.yaml", ["learner.num_workers=2"]), {"CPU": 3.0}, [{"CPU": 3.0}])
    assert (
        "the run needs 3.5 CPU: learner.num_workers 2 x learner.num_cpus 1 + rollout.num_actors 1 x "
        "rollout.num_cpus 1 + reward.replicas 1 x reward.num_cpus 0.5; the cluster has 3"
    ) in str(err.value)
    # CPUs alone (the check before a local Ray starts): other asks wait for the live cluster.
    check_fits(wide, {"CPU": 4.5}, [{"CPU": 4.5}], resources=("CPU",))
    with pytest.raises(UserError, match="the run needs 1 gpu_box"):
        check_fits(wide, {"CPU": 4.5}, [{"CPU": 4.5}])


def smoke_command(tiny_assets, tmp_path, *sets: str) -> list[str]:
    args = [sys.executable, "-m", "cluster.cli", "train", "--config", str(REPO / "configs/smoke.yaml")]
    for item in smoke_overrides(tiny_assets, tmp_path) + list(sets):
        args += ["--set", item]
    return args


def test_a_run_the_cluster_cannot_hold_exits_2_before_anything_starts(tiny_assets, tmp_path):
    out = subprocess.run(
        smoke_command(tiny_assets, tmp_path, "cluster.num_cpus=2"), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "the run needs 2.5 CPU: learner.num_cpus 1 + rollout.num_actors 1 x rollout.num_cpus 1" in out.stderr
    assert "starting a local Ray" not in out.stderr  # known from cluster.num_cpus, before Ray's start


def test_a_signal_while_starting_stops_the_start_at_once(tiny_assets, tmp_path):
    """SIGTERM (`ray job stop`, `timeout`) during start-up: nothing to checkpoint yet, so the
    start stops at once, says what it was doing, exits 143 and leaves no process behind."""
    driver = subprocess.Popen(
        smoke_command(tiny_assets, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in driver.stdout:
        lines.append(line)
        if "starting the learner" in line:
            break
    children = psutil.Process(driver.pid).children(recursive=True)  # the local Ray it started
    driver.send_signal(signal.SIGTERM)
    start = time.monotonic()
    rest, _ = driver.communicate(timeout=60)
    assert driver.returncode == 143, "".join(lines) + rest
    assert time.monotonic() - start < 15
    assert "stopped while starting (starting the learner and 1 rollout actor(s))" in rest
    assert "checkpoint" not in rest
    assert not psutil.wait_procs(children, timeout=30)[1], "a process outlived the stopped start"


def test_a_run_on_a_ray_of_its_own_leaves_no_process_behind(tiny_assets, tmp_path):
    """`tame train` with the local Ray it starts: the run ends, the process exits, and no
    process it started (Ray's, Serve's, the roles') outlives it. Serve goes with that Ray
    rather than being shut down first, which Ray reported as a failed task."""
    driver = subprocess.Popen(
        smoke_command(tiny_assets, tmp_path, "train.total_updates=2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, children = [], []
    for line in driver.stdout:
        lines.append(line)
        if "training to version" in line:  # every role is up
            children = psutil.Process(driver.pid).children(recursive=True)
    driver.wait(timeout=60)
    out = "".join(lines)
    assert driver.returncode == 0 and "done: 2 updates" in out, out[-3000:]
    assert "failed" not in out, out[-3000:]
    assert len(children) > 5, children  # Ray's own processes, Serve's, the learner, the actor
    assert not psutil.wait_procs(children, timeout=30)[1], "a process outlived the run"


def test_a_resume_drops_the_redone_updates_and_a_line_a_killed_driver_left_half_written(tmp_path):
    from cluster.launch import truncate_jsonl

    ledger_file = tmp_path / "ledger.jsonl"
    lines = [json.dumps({"version": v, "prompts": [f"p{v}"]}) for v in (1, 2, 3)]
    ledger_file.write_text("".join(line + "\n" for line in lines) + '{"version": 4, "pro')
    truncate_jsonl(ledger_file, "version", 2)
    assert ledger_file.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.jsonl"]  # no temporary file left


def test_signals_ask_the_loop_to_stop_at_its_next_safe_point():
    """Ctrl-C (SIGINT) and `ray job stop` (SIGTERM) share one handler: while the run starts,
    a signal stops it at once; once it trains, the first only flags the loop (which finishes
    its update and checkpoints: the job test sends SIGTERM to a real driver), a second stops
    at once."""
    from cluster.control import Interrupted, StopSignal, stop_on_signals

    def deliver(signum: int) -> None:
        os.kill(os.getpid(), signum)
        time.sleep(0.2)  # the handler runs in this (the main) thread, here at the latest

    for signum in (signal.SIGINT, signal.SIGTERM):
        stop = StopSignal()
        previous = stop_on_signals(stop)
        try:
            with pytest.raises(Interrupted) as err:
                deliver(signum)
            assert err.value.signum == signum and stop.name is None
            stop.started = True
            deliver(signum)
            assert (stop.name, stop.signum) == (signal.Signals(signum).name, signum)
            with pytest.raises(Interrupted):
                deliver(signum)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def test_a_start_that_waits_says_every_report_what_is_pending_and_fails_at_its_deadline(ray_local):
    from cluster.shared.errors import RunError
    from cluster.shared.startup import Pending, wait_until_up

    polls, logs = [], []
    learner = Pending("the learner", "learner.num_cpus 1", lambda: polls.append(1) or len(polls) > 3, ("CPU",))
    wait_until_up([learner], 5.0, logs.append, report_every_s=100.0, poll_s=0.01)
    assert len(polls) == 4 and logs == []  # up at the fourth poll: nothing to say

    never = Pending(
        "rollout actor 0", "rollout.num_cpus 1, rollout.resources.nowhere 1", lambda: False, ("CPU", "nowhere")
    )
    up = Pending("the learner", "learner.num_cpus 1", lambda: True, ("CPU",))
    start = time.monotonic()
    with pytest.raises(RunError) as failed:
        wait_until_up([never, up], 0.5, logs.append, report_every_s=0.2, poll_s=0.01)
    assert 0.5 <= time.monotonic() - start < 1.5
    pending = "waiting for rollout actor 0 (rollout.num_cpus 1, rollout.resources.nowhere 1); free on the cluster: "
    assert [line.split(": ", 1)[1].startswith(pending) for line in logs] == [True, True], logs
    assert logs[0].startswith("still starting after 0 s") and "of 4 CPU, 0 of 0 nowhere" in logs[0]
    assert str(failed.value).startswith(f"the run did not start within cluster.start_timeout_s 0.5 s: {pending}")
    assert "the learner" not in str(failed.value)


def test_heavy_imports_keep_the_collector_off_and_freeze_what_they_made():
    import gc
    import importlib

    from cluster.shared.startup import heavy_imports

    sys.modules.pop("tabnanny", None)
    frozen = gc.get_freeze_count()
    with heavy_imports():
        assert not gc.isenabled()
        importlib.import_module("tabnanny")
        made = [[] for _ in range(1000)]
    assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(made)
    # Nothing new imported (a second model load, say): nothing frozen, the garbage stays collectable.
    frozen = gc.get_freeze_count()
    gc.disable()  # and a caller's collector that was off stays off
    try:
        with heavy_imports():
            importlib.import_module("tabnanny")
            again = [[] for _ in range(1000)]
        # Frozen objects may die meanwhile (this process has other threads): the count may fall.
        assert not gc.isenabled() and gc.get_freeze_count() < frozen + len(again) and len(made) == 1000
    finally:
        gc.enable()
    # At exit the frozen objects are freed as usual: triton's bindings (vLLM imports them)
    # report any of theirs still alive when they unload.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cluster.shared.startup import heavy_imports\nwith heavy_imports():\n    import triton",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0 and "leaked" not in out.stderr, out.stderr[-2000:]


def test_a_role_no_node_can_hold_ends_the_start_at_its_deadline(tiny_assets, tmp_path):
    """With the resource check off (a cluster that adds nodes when asked), an actor asking for
    a resource no node has waits: the start says so every 10 s, and fails at
    cluster.start_timeout_s with exit 1, naming what it waited for."""
    driver = subprocess.Popen(
        smoke_command(
            tiny_assets,
            tmp_path,
            "cluster.check_resources=false",
            "rollout.resources={nowhere: 1}",
            "cluster.start_timeout_s=11",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, started = [], None
    for line in driver.stdout:
        lines.append(line)
        if "starting the learner" in line:
            started = time.monotonic()
    driver.wait(timeout=60)
    out = "".join(lines)
    assert driver.returncode == 1 and started is not None, out[-3000:]
    # The deadline, then the driver's own Ray shut down: 21 s on the 2-core AVX2 EPYC of 2026-12-06.
    assert time.monotonic() - started < 11 + 25
    actor = "rollout actor 0 (rollout.num_cpus 1, rollout.resources.nowhere 1)"
    report = next(line for line in lines if "still starting after 10 s" in line)
    assert actor in report and "0 of 0 nowhere" in report, report
    assert "tame train: error: the run did not start within cluster.start_timeout_s 11 s: waiting for" in out
    assert actor in out.split("tame train: error: ")[1]
    assert "checkpoint" not in out


def test_a_hung_load_replaces_the_actor_and_a_hung_update_ends_the_run(tiny_assets, ray_local, tmp_path):
    """Deadlines short enough that every reload and every update overruns them: an actor
    that does not confirm a reload is retired and replaced, and its replacement carries the
    run on; an update past learner.update_timeout_s ends the run, stops the learner and says
    there is no checkpoint to resume from."""
    from cluster.controller import RunError

    run = Run(
        smoke(
            tiny_assets,
            tmp_path,
            "run.name=hung-load",
            "rollout.load_timeout_s=0.001",
            "train.max_staleness=0",
            "train.total_updates=2",
            *SMALL_BATCHES,
        )
    )
    run.join(timeout=300)
    assert run.error is None, (run.error, run.logs[-10:])
    summary, entries = run.summary, ledger(run.cfg.run_dir)
    assert summary["steps"] == 2 and summary["load_timeouts"] >= 1
    assert [e["actors"] for e in entries] == [[0], [1]]  # the first load after update 1 overran
    assert any(
        "actor 0 removed: it did not confirm a weight load within rollout.load_timeout_s 0.001 s" in line
        for line in run.logs
    ), run.logs
    trained = [p for e in entries for p in e["prompts"]]
    assert len(trained) == len(set(trained)) == 16

    run = Run(smoke(tiny_assets, tmp_path, "run.name=hung-update", "learner.update_timeout_s=0.001"))
    run.join(timeout=300)
    assert isinstance(run.error, RunError), (run.error, run.logs[-10:])
    assert str(run.error) == (
        "an update took longer than learner.update_timeout_s 0.001 s, so the learner was "
        "stopped; resume with `tame train --resume`: no checkpoint was written yet"
    )
    summary = json.loads((run.cfg.run_dir / "summary.json").read_text())
    assert summary["error"] == str(run.error) and summary["steps"] == 0
    assert not psutil.wait_procs([p for p in [process(summary["placement"]["learner"]["pid"])] if p], timeout=30)[1]


def test_a_run_whose_calls_can_never_be_scored_ends_at_its_deadline_keeping_every_prompt(
    tiny_assets, ray_local, tmp_path
):
    """A rule function that fails on every item: each call's prompts are handed out again,
    never scored as 0, until reward.failing_timeout_s ends the run naming the failure. The
    run scores with a reward application of its own, and leaves the Serve it started running
    for `tame serve-reward`'s application, deployed on the same cluster meanwhile."""
    from ray import serve

    from cluster.controller import RunError
    from cluster.demo.world import gold_reward
    from cluster.shared.startup import wait_until_up
    from reward_service.service import coming_up, deploy

    other = smoke(
        tiny_assets,
        tmp_path,
        "model.reward=null",
        "learner.critic=policy",
        "reward.num_cpus=0.25",
        "reward.functions=[{function: 'tests.faults:gold_unless_poisoned', weight: 1.0}]",
    )
    serve.shutdown()  # the run starts Serve, as on a cluster where nothing serves yet
    run = Run(
        smoke(
            tiny_assets,
            tmp_path,
            "run.name=unscorable",
            "reward.failing_timeout_s=8",  # room for a second call on a busy machine
            "reward.functions=[{function: 'tests.faults:unscorable', weight: 1.0}]",
            *SMALL_BATCHES,
        )
    )
    run.wait_for("the run to start", lambda status, entries: True)
    handle = deploy(other, http=False, name="tame-reward", wait=False)
    wait_until_up([coming_up(other, "tame-reward")], 120, log=lambda *_: None)
    run.join(timeout=300)
    assert isinstance(run.error, RunError), (run.error, run.logs[-10:])
    assert str(run.error).startswith("no generation call could be scored for "), run.error
    assert str(run.error).endswith(
        " s of calls (reward.failing_timeout_s 8); the last failure: RewardError: the reward "
        "service cannot score these items: items.0: reward function "
        "tests.faults:unscorable failed: ValueError: no reward for this item"
    ), run.error
    summary = json.loads((run.cfg.run_dir / "summary.json").read_text())
    assert summary["error"] == str(run.error) and summary["steps"] == 0 and summary["failed_prompts"] >= 16
    # Nothing trained, nothing lost: the prompts handed out are all outstanding, once each.
    assert ledger(run.cfg.run_dir) == []
    assert len(summary["outstanding_prompts"]) == len(set(summary["outstanding_prompts"])) >= 8
    apps = serve.status().applications
    assert "tame-reward-unscorable" not in apps and apps["tame-reward"].status == "RUNNING"
    assert handle.score.remote(["Where does Quinn live?"], ["Oslo"]).result(timeout_s=60) == [
        gold_reward("Where does Quinn live?", "Oslo")
    ]
    serve.delete("tame-reward")


def test_a_run_does_not_resume_from_a_checkpoint_it_cannot_load(tiny_assets, tmp_path):
    from cluster.checks import check_resumable
    from cluster.shared.errors import UserError
    from tests.runs import smoke

    cfg = smoke(tiny_assets, tmp_path, "run.name=switch")
    checkpoint = cfg.run_dir / "checkpoints" / "version-000002"
    (checkpoint / "policy").mkdir(parents=True)
    (checkpoint / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(UserError, match="ppo.advantage: .*version-000002 was trained without a critic"):
        check_resumable(cfg)
    check_resumable(smoke(tiny_assets, tmp_path, "run.name=switch", "ppo.advantage=reinforce_pp"))
    (checkpoint / "critic").mkdir()
    check_resumable(cfg)
    # A checkpoint from before sharded checkpoints resumes with one learner worker only.
    sharded = smoke(tiny_assets, tmp_path, "run.name=switch", "learner.num_workers=2")
    with pytest.raises(UserError, match="learner.num_workers: .*version-000002 was written by a tame without sharded"):
        check_resumable(sharded)
    (checkpoint / "sharded").mkdir()
    check_resumable(sharded)


def test_serve_reward_checks_its_replicas_fit_before_deploying(tiny_assets):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve-reward",
            "--model",
            str(tiny_assets.reward),
            "--replicas",
            "2",
            "--set",
            "cluster.num_cpus=1",
            "--set",
            "reward.num_cpus=1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "the run needs 2 CPU: reward.replicas 2 x reward.num_cpus 1; the cluster has 1" in out.stderr
    assert "reward service at" not in out.stdout
    # Unchecked (a cluster that adds nodes when asked), a replica nothing can place waits
    # until the start deadline, which names what it waited for.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve-reward",
            "--model",
            str(tiny_assets.reward),
            "--set",
            "cluster.num_cpus=2",
            "--set",
            "cluster.check_resources=false",
            "--set",
            "reward.num_gpus=1",
            "--set",
            "cluster.start_timeout_s=3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert (
        "the reward service did not start within cluster.start_timeout_s 3 s: waiting for the reward service "
        "(reward.replicas 1 x reward.num_cpus 1, reward.num_gpus 1); free on the cluster: 2 of 2 CPU, 0 of 0 GPU"
    ) in out.stderr


def test_an_autoscaled_pool_grows_for_its_reason_until_tame_scale_takes_over(tiny_assets, ray_local, tmp_path):
    """rollout.autoscale between 1 and 2 actors, synchronous PPO: two calls of 4 prompts make a
    batch, so the rule predicts 2 actors after its first window and the pool grows, with the
    reason logged, in metrics.jsonl and in wandb. A `tame scale` then sets the size and turns
    the rule off. Every prompt is trained once."""
    import ray

    from cluster.control import scale
    from tests.wandb_offline import history

    run = Run(
        smoke(
            tiny_assets,
            tmp_path,
            "run.name=autoscaled",
            "rollout.num_actors=1",
            "rollout.autoscale.min_actors=1",
            "rollout.autoscale.max_actors=2",
            "rollout.autoscale.window=1",
            "rollout.autoscale.cooldown=1",
            "rollout.autoscale.slack=0",
            "train.total_updates=10000",
            *SMALL_BATCHES,
            "rollout.prompts_per_batch=4",
            prompts=few_prompts(tiny_assets, tmp_path),
        )
    )
    grown = run.wait_for("the pool grown by the rule", lambda s, e: trained_by(1, e))
    reason = "grow 1 -> 2: the learner waited"
    assert grown["autoscale"]["on"] and grown["autoscale"]["last_decision"], grown["autoscale"]
    assert any(line.startswith(f"rollout.autoscale: {reason}") for line in run.logs), run.logs
    assert scale(1, run="autoscaled", address=ray.get_runtime_context().gcs_address)["num_actors"] == 1
    status = run.wait_for("the pool back to one", lambda s, e: len(s["actors"]) == 1 and not s["autoscale"]["on"])
    assert status["num_actors"] == 1
    assert "`tame scale` asked for 1 actors: rollout.autoscale is off for the rest of the run" in run.logs
    run.stop()
    run.join(timeout=300)
    assert run.error is None and run.summary is not None, run.error

    rows = [json.loads(line) for line in (run.cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    ruled = [r for r in rows if "rollout/autoscale_target" in r]  # until `tame scale`
    assert [r["rollout/autoscale_target"] for r in ruled][:2] == [1, 2], rows  # update 1: the cooldown
    assert ruled[1]["rollout/autoscale_reason"].startswith(reason) and len(ruled) < len(rows)
    assert all("rollout/num_actors" in r for r in rows)
    logged = [r for r in history(run.cfg.run_dir) if "rollout/autoscale_reason" in r]
    assert logged and logged[1]["rollout/autoscale_reason"].startswith(reason)
    assert_each_prompt_once(ledger(run.cfg.run_dir), run.summary, 24)
