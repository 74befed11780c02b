"""A shortened `tame demo` end to end (tiny assets, few steps): every stage runs for real,
and the report, the plot and the summary are produced and agree with each other."""

from __future__ import annotations

import json


def test_short_demo_produces_a_consistent_summary(ray_local, tmp_path):
    from cluster.demo.run import run_demo

    summary = run_demo(out=tmp_path, size="tiny", log=lambda *_: None, overrides=[
        "sft.epochs=1", "reward_model.epochs=1", "train.total_updates=2", "train.rollout_batch_size=32",
        "rollout.prompts_per_batch=32", "ppo.minibatch_size=32", "ppo.micro_batch_size=32",
        "logging.wandb.mode=disabled",
    ])
    run_dir = tmp_path / "ppo"
    written = json.loads((run_dir / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["steps"] == 2 and written["samples"] == 64
    for stage in ("sft", "ppo"):
        gold = written["gold"][stage]
        assert all(0.0 <= gold[k] <= 1.0 for k in ("truthful", "harmless", "helpful", "score"))
        # The gold score of a response is the mean of its three verdicts, so the mean score
        # is the mean of the three rates.
        assert abs(gold["score"] - (gold["truthful"] + gold["harmless"] + gold["helpful"]) / 3) < 1e-9
    assert 0.5 < written["rm_accuracy"] <= 1.0
    assert written["kl_to_sft"] == written["kl_end"]
    assert set(written["stage_seconds"]) == {"assets", "sft", "reward_model", "eval_sft", "ppo", "eval_ppo"}
    assert (run_dir / "demo.png").stat().st_size > 10_000
    # The PPO policy evaluated is the final checkpoint, loadable by vLLM and transformers.
    assert written["policy"].endswith("version-000002/policy")
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2]
    assert all("gold/score" in row for row in history)
