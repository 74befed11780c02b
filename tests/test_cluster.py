"""The actor-learner loop end to end on CPU: real Ray, vLLM actors, a Serve reward
deployment, the learner, and wandb offline read back from its run file."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from tests.conftest import REPO
from tests.runs import SMALL_BATCHES, assert_each_prompt_once, few_prompts, ledger, smoke, uninterrupted
from tests.wandb_offline import history

DESIGN_METRICS = [
    "objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
    "objective/non_score_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
    "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens",
    "rollout/staleness_mean", "rollout/staleness_max", "rollout/behaviour_kl", "rollout/max_abs_logp_delta",
    "sync/version", "sync/bytes", "sync/publish_seconds", "perf/samples_per_s", "perf/learner_idle_share",
    "rollout/queue_depth",
]


def test_synchronous_loop_trains_on_fresh_records_and_logs_to_wandb(tiny_assets, ray_local, tmp_path):
    from cluster.controller import train

    cfg = smoke(tiny_assets, tmp_path, "train.max_staleness=0", "train.total_updates=3", "run.name=sync")
    summary = train(cfg, log=lambda *_: None)

    assert summary["steps"] == 3 and summary["policy_version"] == 3
    assert summary["samples"] == 3 * cfg.train.rollout_batch_size
    assert summary["fingerprint_mismatches"] == 0 and summary["dropped_stale"] == 0
    # max_staleness 0: every record of update v+1 was made by policy version v, so the
    # versions the actors generated with advanced with the learner's.
    for entry in ledger(cfg.run_dir):
        assert set(entry["record_versions"]) == {entry["version"] - 1}
    # Each update trained on the next 16 prompts of the source, as the resume tests expect.
    chunks, position = uninterrupted(cfg, 3, 16)
    assert [e["prompts"] for e in ledger(cfg.run_dir)] == chunks and summary["data_position"] == position

    rows = [r for r in history(cfg.run_dir) if "objective/kl" in r]
    assert [r["sync/version"] for r in rows] == [1, 2, 3]
    for name in DESIGN_METRICS:
        assert name in rows[-1], name
    assert all(r["rollout/staleness_max"] == 0 for r in rows)
    # The sync alarm stays quiet when the actors really hold the learner's weights.
    assert all(r["rollout/max_abs_logp_delta"] < 1e-3 for r in rows)
    assert (cfg.run_dir / "config.yaml").is_file()
    written = json.loads((cfg.run_dir / "summary.json").read_text())
    assert written["steps"] == 3 and written["samples_per_second"] > 0


def test_async_loop_scales_the_pool_and_counts_every_prompt_once(tiny_assets, ray_local, tmp_path):
    from cluster.controller import CONTROL_PREFIX, NAMESPACE, train

    prompts = few_prompts(tiny_assets, tmp_path)
    cfg = smoke(tiny_assets, tmp_path, "train.max_staleness=1", "train.total_updates=10000", "run.name=scaled",
                *SMALL_BATCHES, prompts=prompts)

    import ray

    result = {}
    runner = threading.Thread(target=lambda: result.update(train(cfg, log=lambda *_: None)))
    runner.start()

    def wait_for(predicate, limit=300):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and runner.is_alive():
            if (cfg.run_dir / "ledger.jsonl").exists() and predicate(ledger(cfg.run_dir)):
                return True
            time.sleep(0.5)
        return False

    address = ray.get_runtime_context().gcs_address

    def tame_scale(n):
        out = subprocess.run([sys.executable, "-m", "cluster.cli", "scale", "--actors", str(n), "--run", "scaled",
                              "--address", address], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr

    assert wait_for(lambda entries: len(entries) >= 1)
    tame_scale(2)
    assert wait_for(lambda entries: any(1 in e["actors"] for e in entries)), "the second actor never trained"
    tame_scale(1)
    # Back to one actor: the second drains, and from then on only the first one's samples arrive.
    assert wait_for(lambda entries: len(entries) > 3 and all(e["actors"] == [0] for e in entries[-3:]))
    ray.get_actor(CONTROL_PREFIX + "scaled", namespace=NAMESPACE).stop.remote()
    runner.join(timeout=300)
    assert not runner.is_alive() and result

    entries = ledger(cfg.run_dir)
    actors = Counter(a for e in entries for a in e["actors"])
    assert actors[0] > 0 and actors[1] > 0
    for e in entries:
        assert all(e["version"] - 1 - v <= 1 for v in e["record_versions"])
    assert_each_prompt_once(entries, result, 24)

    # The named control actor is gone with the run.
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
    assert CONTROL_PREFIX + "scaled" not in names


def test_scale_without_a_running_job_is_a_usage_error(ray_local):
    address = ray_local.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "scale", "--actors", "2", "--run", "nope",
                          "--address", address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--run nope: no such running tame job" in out.stderr


@pytest.mark.parametrize("bad, needle", [
    ("model.policy=/does/not/exist", "model.policy: /does/not/exist is not a Hugging Face causal LM folder"),
    ("data.prompts=/does/not/exist.jsonl", "/does/not/exist.jsonl: data file not found"),
])
def test_bad_inputs_exit_2_before_ray(tiny_assets, tmp_path, bad, needle):
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--config", str(REPO / "configs/smoke.yaml"),
                          "--set", "model.build_assets=null", "--set", f"model.reward={tiny_assets.reward}",
                          "--set", f"model.policy={tiny_assets.policy}",
                          "--set", f"data.prompts={tiny_assets.data / 'prompts.jsonl'}",
                          "--set", f"run.output_dir={tmp_path}", "--set", bad],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert not (tmp_path / "smoke").exists()  # nothing half-written
