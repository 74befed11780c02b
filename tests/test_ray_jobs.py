"""tame on clusters it did not start: a Ray job submitted with `ray job submit` to a head
started by the test, and a multi-node cluster with the learner and the actors on different
nodes. Each cluster lives in processes of its own and is torn down by the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from cluster.prompts import PromptSource
from cluster.shared.data import load_prompts
from tests.conftest import REPO
from tests.runs import DESIGN_METRICS, ledger, smoke, smoke_overrides, uninterrupted
from tests.support import free_port, process
from tests.wandb_offline import history

BIN = Path(sys.executable).parent


def job_overrides(tiny_assets, out_dir, name):
    return [*smoke_overrides(tiny_assets, out_dir), f"run.name={name}", "train.total_updates=2"]


def test_ray_job_killed_and_stopped_resumes_where_it_stopped(tiny_assets, tmp_path):
    """`ray job submit` to a head the test starts. The job's driver is killed with SIGKILL
    after its checkpoint at version 2; resubmitted with --resume, it is stopped with `ray job
    stop` (SIGTERM) after update 3: the signal finishes the update in flight, writes a final
    checkpoint and stops every process of the run. Resubmitted again, it ends as an
    uninterrupted run would: same prompts per update, same data position, one wandb run, the
    metrics users watch."""
    port, dashboard = free_port(), free_port()
    # Every port of this head is a free one: another Ray on the machine (the test session's
    # own) holds the defaults, and a job agent that cannot bind makes submission fail.
    ports = [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
            "node-manager-port",
            "object-manager-port",
        )
    ]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    # This process's wandb service, if an earlier test started one, is not the jobs' to share:
    # a killed driver's run would stay open in it and the resumed driver find its id in use.
    env.pop("WANDB_SERVICE", None)
    # Short: Ray puts Unix sockets there, whose paths may not exceed 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="tame-ray-", dir="/tmp")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            *ports,
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    total = 20  # room for `ray job stop` to land in the middle: an update takes a fraction of a second
    overrides = [*job_overrides(tiny_assets, tmp_path / "runs", "job"), f"train.total_updates={total}"]
    run_dir = tmp_path / "runs" / "job"

    def driver() -> psutil.Process:
        """The job's driver process: `python -m cluster.cli train` on this run."""
        found = [
            p
            for p in psutil.process_iter(["cmdline"])
            if str(run_dir.parent) in " ".join(p.info["cmdline"] or [])
            and "train" in (p.info["cmdline"] or [])
            and Path((p.info["cmdline"] or [""])[0]).name.startswith("python")
        ]
        assert len(found) == 1, [p.info["cmdline"] for p in found]
        return found[0]

    def ray_job(command, *args, timeout=600):
        return subprocess.run(
            [str(BIN / "ray"), "job", command, f"--address={address}", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # The job ships tame's code as the README says: the working directory is uploaded, Ray
    # puts it on the workers' import path, and the entrypoint runs the CLI as a module. A
    # copy of the checkout shows that the code which ran is the uploaded one.
    checkout = tmp_path / "checkout"
    shutil.copytree(
        REPO,
        checkout,
        ignore=shutil.ignore_patterns(".venv", ".git", "runs", "wandb", "__pycache__", "*.egg-info", ".pytest_cache"),
    )

    def submit(job_args: list[str], train_args: list[str]):
        sets = [a for o in overrides for a in ("--set", o)]
        for _ in range(12):
            out = ray_job(
                "submit",
                f"--working-dir={checkout}",
                *job_args,
                "--",
                "python",
                "-m",
                "cluster.cli",
                "train",
                "--config",
                "configs/smoke.yaml",
                *sets,
                *train_args,
            )
            # The job server answers before its agent has registered: Ray asks to try again.
            if "No available agent to submit job" not in out.stdout + out.stderr:
                return out
            time.sleep(5)
        return out

    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(address, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head never answered"
                time.sleep(1)

        out = submit(["--no-wait", "--submission-id=first"], [])
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "version-000002" / "trainer_state.pt").exists():
            if time.monotonic() > deadline or (run_dir / "summary.json").exists():
                raise AssertionError(ray_job("logs", "first").stdout[-3000:])
            time.sleep(0.2)
        wandb_id = (run_dir / "wandb_id").read_text()
        driver().kill()  # SIGKILL: no handler, no final checkpoint
        deadline = time.monotonic() + 120
        while "failed" not in ((status := ray_job("status", "first")).stdout + status.stderr).lower():
            assert time.monotonic() < deadline, f"the killed job never failed: {status.stdout} {status.stderr}"
            time.sleep(1)
        code = ray_job("logs", "first").stdout.split("tame's code from ")[1].split(")")[0]
        assert "runtime_resources" in code and not code.startswith(str(REPO)), code

        # A run the cluster can never hold ends at once with exit 2, naming the fields.
        start = time.monotonic()
        out = submit(["--submission-id=too-big"], ["--set", "run.name=too-big", "--set", "rollout.num_actors=4"])
        assert time.monotonic() - start < 30 and out.returncode != 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert (
            "the run needs 5.5 CPU: learner.num_cpus 1 + rollout.num_actors 4 x rollout.num_cpus 1 + "
            "reward.replicas 1 x reward.num_cpus 0.5; the cluster has 4"
        ) in out.stdout + out.stderr
        assert "exit code 2" in (status := ray_job("status", "too-big")).stdout + status.stderr, status.stdout

        def resume_and_wait(name: str, version: int, job_args=()):
            """Resubmit with --resume; return once it resumed at `version` and trained one more.
            No periodic checkpoints: the one a signal leaves can only come from the signal."""
            out = submit(
                ["--no-wait", f"--submission-id={name}", *job_args],
                ["--resume", "--set", "learner.checkpoint_every=1000"],
            )
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            deadline = time.monotonic() + 300
            while f"resumed at policy version {version}" not in (logs := ray_job("logs", name).stdout):
                assert time.monotonic() < deadline, logs[-3000:]
                time.sleep(0.5)
            while len(ledger(run_dir)) < version + 1:  # the resumed driver has cut the ledger back
                if time.monotonic() > deadline or (run_dir / "summary.json").exists():
                    raise AssertionError(ray_job("logs", name).stdout[-3000:])
                time.sleep(0.1)

        def interrupted(name: str, signal_name: str, after: int, sent: float) -> dict:
            """The summary a signal (`sent` at that time) left: a final checkpoint at its
            version, written after the signal, and every process gone."""
            deadline = time.monotonic() + 120
            while not (run_dir / "summary.json").is_file():
                assert time.monotonic() < deadline, ray_job("logs", name).stdout[-3000:]
                time.sleep(0.2)
            stopped = json.loads((run_dir / "summary.json").read_text())
            assert stopped["error"] == f"interrupted ({signal_name})" and after < stopped["steps"] < total, stopped
            assert stopped["checkpoint"].endswith(f"version-{stopped['steps']:06d}")
            assert (Path(stopped["checkpoint"]) / "trainer_state.pt").stat().st_mtime >= sent
            placed = stopped["placement"]
            pids = [placed["learner"]["pid"], *(a["pid"] for a in placed["actors"].values())]
            alive = psutil.wait_procs([p for p in map(process, pids) if p], timeout=60)[1]
            assert not alive, f"a process outlived the run: {alive}"
            return stopped

        # `ray job stop`: SIGTERM, then SIGKILL this long after it (time for the checkpoint).
        # Ctrl-C (SIGINT) goes to the same handler (test_signals_ask_the_loop_to_stop_at_its_next_safe_point).
        stop_wait = '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}'
        resume_and_wait("resumed", 2, [f"--runtime-env-json={stop_wait}"])
        sent = time.time()
        out = ray_job("stop", "resumed")
        assert out.returncode == 0 and "stopped" in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
        stopped = interrupted("resumed", "SIGTERM", 2, sent)

        out = submit(["--submission-id=finished"], ["--resume"])
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert f"resumed at policy version {stopped['steps']}" in out.stdout + out.stderr
    finally:
        # The cluster is the test's own, and nothing of it is checked after the run: it is
        # killed at once (a graceful stop waited half a minute on its processes).
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        left = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        for p in left:
            p.kill()
        outlived = psutil.wait_procs(left, timeout=30)[1]
    assert not outlived, f"processes of the head outlived it: {outlived}"

    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = smoke(tiny_assets, tmp_path / "runs", *overrides)
    chunks, position = uninterrupted(cfg, total, 16)
    assert summary["steps"] == summary["policy_version"] == total and summary["samples"] == 16 * total
    assert summary["fingerprint_mismatches"] == 0 and summary["dropped_stale"] == 0
    assert summary["error"] is None and summary["samples_per_second"] > 0
    # Each update's prompts (in the order they ended, so compared as sets).
    assert [sorted(e["prompts"]) for e in ledger(run_dir)] == [sorted(c) for c in chunks]
    assert summary["data_position"] == position
    # max_staleness 0: every record of update v+1 was made by policy version v, across resumes.
    for entry in ledger(run_dir):
        assert set(entry["record_versions"]) == {entry["version"] - 1}
    assert (run_dir / "config.yaml").is_file()
    # One wandb run across the three drivers: each resumed one reopened it.
    assert (run_dir / "wandb_id").read_text() == wandb_id
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and all(d.name.endswith("-" + wandb_id.strip()) for d in runs), runs
    # metrics.jsonl has every update once. wandb's writer is a child process of the driver,
    # which the job supervisor kills too: the offline files of the killed and the stopped
    # drivers may miss their last steps; the last driver logged all of its own.
    metrics = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, total + 1))
    rows = [row for row in history(run_dir) if "sync/version" in row]
    assert [r["sync/version"] for r in rows][-(total - stopped["steps"]) :] == list(
        range(stopped["steps"] + 1, total + 1)
    )
    for name in DESIGN_METRICS:
        assert name in rows[-1], name
    assert all(r["rollout/staleness_max"] == 0 for r in rows)
    # The sync alarm stays quiet when the actors really hold the learner's weights.
    assert all(r["rollout/max_abs_logp_delta"] < 1e-3 for r in rows)


def test_multi_node_places_learner_and_actors_on_different_nodes(tiny_assets, tmp_path):
    """A sharded learner (2 workers, FSDP2 over gloo) on one node, the actors on the other.
    Also the critic-free path end to end: GRPO over 4 samples of each prompt, KL in the
    loss, Dr. GRPO's aggregation: no critic is trained, passed or saved."""
    out = tmp_path / "result.json"
    grpo = [
        "ppo.advantage=grpo",
        "rollout.sampling.samples_per_prompt=4",
        "ppo.kl.placement=loss",
        "ppo.loss_aggregation=token_sum_norm",
    ]
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests/multinode_main.py"),
            str(REPO / "configs/smoke.yaml"),
            str(out),
            *job_overrides(tiny_assets, tmp_path / "runs", "multinode"),
            *grpo,
            "learner.num_workers=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    placement, nodes = result["summary"]["placement"], result["nodes"]
    assert result["summary"]["steps"] == 2
    assert placement["learner"]["node"] == nodes["head"]
    assert [w["node"] for w in placement["learner"]["workers"]] == [nodes["head"]] * 2
    assert {a["node"] for a in placement["actors"].values()} == {nodes["worker"]}

    checkpoint = Path(result["summary"]["checkpoint"])
    assert sorted(p.name for p in checkpoint.iterdir()) == ["policy", "sharded", "trainer_state.pt"]
    policy_parameters = json.loads((tiny_assets.root / "assets.json").read_text())["policy_parameters"]
    rows = [json.loads(line) for line in (checkpoint.parents[1] / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["learner/trained_parameters"] == policy_parameters  # the policy alone
        assert "loss/value_avg" not in row and "val/mean" not in row and "loss/kl_avg" in row
    # 4 prompts of 4 samples per update: each prompt's group whole in one update, the prompts
    # in the source's order, as one learner worker trains them.
    entries = ledger(checkpoint.parents[1])
    source = PromptSource(load_prompts(tiny_assets.data / "prompts.jsonl"), seed=0)
    assert [sorted(e["prompts"]) for e in entries] == [sorted(p.prompt_id for p in source.take(4)) for _ in entries]
    # The actors loaded what the sharded learner published, probe for probe.
    assert all(row["sync/fingerprint_mismatches"] == 0 and row["learner/workers"] == 2 for row in rows)
