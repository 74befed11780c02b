"""tame on clusters it did not start: a Ray job submitted with `ray job submit` to a head
started by the test, and a multi-node cluster with the learner and the actors on different
nodes. Each cluster lives in processes of its own and is torn down by the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_overrides(tiny_assets, out_dir, name):
    return ["model.build_assets=null", f"model.policy={tiny_assets.policy}", f"model.reward={tiny_assets.reward}",
            f"data.prompts={tiny_assets.data / 'prompts.jsonl'}", f"run.output_dir={out_dir}", f"run.name={name}",
            "train.total_updates=2"]


def test_ray_job_submit_runs_tame_train(tiny_assets, tmp_path):
    port, dashboard = free_port(), free_port()
    # Every port of this head is a free one: another Ray on the machine (the test session's
    # own) holds the defaults, and a job agent that cannot bind makes submission fail.
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *ports,
         # Short: Ray puts Unix sockets there, whose paths may not exceed 107 bytes.
         f"--temp-dir={tempfile.mkdtemp(prefix='tame-ray-', dir='/tmp')}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(address, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head never answered"
                time.sleep(1)
        sets = [a for o in smoke_overrides(tiny_assets, tmp_path / "runs", "job") for a in ("--set", o)]
        for _ in range(12):
            out = subprocess.run(
                [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
                 "tame", "train", "--config", "configs/smoke.yaml", *sets],
                env=env, capture_output=True, text=True, timeout=600)
            # The job server answers before its agent has registered: Ray asks to try again.
            if "No available agent to submit job" not in out.stdout + out.stderr:
                break
            time.sleep(5)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        summary = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["samples"] == 32
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def test_multi_node_places_learner_and_actors_on_different_nodes(tiny_assets, tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "tests/multinode_main.py"), str(REPO / "configs/smoke.yaml"), str(out),
         *smoke_overrides(tiny_assets, tmp_path / "runs", "multinode")],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    placement, nodes = result["summary"]["placement"], result["nodes"]
    assert result["summary"]["steps"] == 2
    assert placement["learner"]["node"] == nodes["head"]
    assert {a["node"] for a in placement["actors"].values()} == {nodes["worker"]}
