"""Config loading, overrides and every kind of bad config: exit code 2, key, file and line named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError

from cluster.shared.config import TameConfig
from cluster.shared.config_file import load_config
from cluster.shared.errors import ConfigError

REPO_CONFIGS = ["configs/demo.yaml", "configs/smoke.yaml", "configs/gpu.yaml", "configs/gpu-2node.yaml"]


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def loads_or_fails_with(tmp_path, text: str, needle: str | None, **options) -> None:
    """The config `text` loads (needle None), or fails with a message that holds `needle`."""
    if needle is None:
        load_config(write(tmp_path, text), **options)
        return
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), **options)
    assert needle in str(err.value)


@pytest.mark.parametrize("name", REPO_CONFIGS)
def test_shipped_configs_are_valid(name):
    from tests.conftest import REPO

    cfg = load_config(REPO / name)
    assert isinstance(cfg, TameConfig)


def test_yaml_values_and_overrides_apply(tmp_path):
    path = write(tmp_path, "ppo:\n  clip_ratio: 0.3\n  kl:\n    coef: 0.02\nrollout:\n  num_actors: 2\n")
    cfg = load_config(path, ["ppo.kl.coef=0.5", "rollout.sampling.stop=[a, b]", "run.name=x1"])
    assert cfg.ppo.clip_ratio == 0.3
    assert cfg.ppo.kl.coef == 0.5  # the override wins over the file
    assert cfg.rollout.num_actors == 2
    assert cfg.rollout.sampling.stop == ["a", "b"]
    assert str(cfg.run_dir) == "runs/x1"
    # Defaults fill what the file leaves out.
    assert cfg.ppo.gae_lambda == TameConfig().ppo.gae_lambda


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_staleness=2"])
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.max_staleness = 3
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(
    "text, override, needle",
    [
        ("ppo:\n  clip_ratio: 0.2\n  klcoef: 0.1\n", [], "c.yaml:3: ppo.klcoef: unknown key"),
        ("rollout:\n  num_actors: many\n", [], "c.yaml:2: rollout.num_actors: Input should be a valid integer"),
        ("ppo:\n  gamma: 1.5\n", [], "c.yaml:2: ppo.gamma: Input should be less than or equal to 1"),
        ("train:\n  max_staleness: -1\n", [], "c.yaml:2: train.max_staleness"),
        ("ppo:\n  minibatch_size: 16\n  micro_batch_size: 5\n", [], "micro_batch_size (5) must divide"),
        ("run: {}\n", ["ppo.kll.coef=1"], "--set ppo.kll: ppo.kll: unknown key"),
        ("run: {}\n", ["rollout.sampling.temperature=0"], "--set rollout.sampling.temperature"),
        ("ppo: [1, 2\n", [], "c.yaml:2: invalid YAML"),
        ("- 1\n- 2\n", [], "c.yaml:1: the config must be a mapping"),
    ],
)
def test_bad_config_names_key_file_and_line(tmp_path, text, override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), override)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "text, line, key, first",
    [
        ("ppo:\n  clip_ratio: 0.3\nrollout:\n  num_actors: 2\nppo:\n  epochs: 2\n", 5, "ppo", 1),
        ("ppo:\n  kl:\n    coef: 0.1\n    coef: 0.2\n", 4, "ppo.kl.coef", 3),
        ("run:\n  seed: 1\n  seed: 1\n", 3, "run.seed", 2),  # the same value twice is still a mistake
        ("reward:\n  functions:\n    - function: m:f\n      function: m:g\n", 4, "reward.functions.0.function", 3),
        ("run:\n  yes: 1\n  true: 2\n", 3, "run.true", 2),  # YAML 1.1 reads both as the key True
    ],
)
def test_a_key_given_twice_is_refused_with_file_line_and_key_path(tmp_path, text, line, key, first):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert (
        str(err.value) == f"{path}:{line}: invalid YAML: {key}: duplicate key, first on line {first} "
        "(YAML would keep only the last)"
    )


def test_a_duplicate_section_exits_2_and_merge_keys_still_override(tmp_path):
    path = write(tmp_path, "ppo:\n  epochs: 3\nppo:\n  epochs: 2\n")
    out = tame("config", "show", "--config", str(path))
    assert out.returncode == 2, out.stderr
    assert f"{path}:3: invalid YAML: ppo: duplicate key, first on line 1" in out.stderr
    # A `<<` merge brings keys in to be overridden, and lines are still reported after one.
    path = write(
        tmp_path, "run:\n  seed: 2\nlogging:\n  <<: {sample_every: 4}\n  sample_every: 6\n  samples_in_table: 0\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:6: logging.samples_in_table: Input should be greater than or equal to 1" in str(err.value)
    cfg = load_config(path, ["logging.samples_in_table=2"])
    assert (cfg.run.seed, cfg.logging.sample_every) == (2, 6)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("learner:\n  device: cuda\n", "c.yaml:2: learner.device cuda needs learner.num_gpus >= 1 (got 0.0)"),
        ("learner:\n  device: cuda:1\n  num_gpus: 1\n", "c.yaml:2: learner.device: Input should be 'cpu' or 'cuda'"),
        (
            "learner:\n  compute_dtype: float16\n",
            "c.yaml:2: learner.compute_dtype: float16 needs a gradient scaler, which tame does not have: use bfloat16",
        ),
        (
            "learner:\n  param_dtype: bfloat16\n",
            "c.yaml:2: learner.param_dtype and learner.reduce_dtype are the mixed precision of a sharded learner "
            "(learner.num_workers >= 2)",
        ),
        ("learner:\n  num_workers: 2\n  param_dtype: bfloat16\n  reduce_dtype: float32\n", None),
        ("learner:\n  num_workers: 0\n", "c.yaml:2: learner.num_workers: Input should be greater than or equal to 1"),
        (
            "rollout:\n  num_gpus: 2\n",
            "c.yaml:2: rollout.num_gpus: 2.0 GPUs per engine: one engine spans at most one GPU",
        ),
        (
            "rollout:\n  num_gpus: 0.5\n  gpu_memory_utilization: 0.6\n",
            "c.yaml:2: rollout.num_gpus 0.5 packs 2 engines on one GPU, each taking "
            "rollout.gpu_memory_utilization 0.6 of it: 1.20 > 0.95. Lower gpu_memory_utilization to 0.47",
        ),
        ("rollout:\n  num_gpus: 0.25\n  gpu_memory_utilization: 0.2\n", None),
        ("rollout:\n  gpu_memory_utilization: 0.99\n", "c.yaml:2: rollout.gpu_memory_utilization"),
        (
            "model:\n  dtype: bfloat16\nlearner:\n  transport_dtype: float32\n",
            "c.yaml:4: learner.transport_dtype float32 sends weights the model.dtype bfloat16 engines round on "
            "arrival, so no weight sync could be verified",
        ),
        ("model:\n  dtype: float32\nlearner:\n  transport_dtype: bfloat16\n", None),  # widened exactly
        (
            "learner:\n  num_workers: 2\n  param_dtype: bfloat16\nrollout:\n  reference_logprobs: true\n",
            "c.yaml:5: rollout.reference_logprobs has the actors compute the reference from float32 weights, but "
            "learner.param_dtype bfloat16",
        ),
        ("learner:\n  num_workers: 2\n  param_dtype: float32\nrollout:\n  reference_logprobs: true\n", None),
        (
            "reward:\n  max_length: 100\n",
            "c.yaml:2: reward.max_length (100) is below data.max_prompt_tokens (256) + "
            "rollout.sampling.max_new_tokens (48) = 304",
        ),
        (
            "reward:\n  max_length: 100\n  functions:\n    - function: m:f\n"
            "model:\n  reward: null\nlearner:\n  critic: policy\n",
            None,
        ),  # no reward model, nothing cut
        (
            "reward:\n  autoscaling:\n    min_replicas: 3\n    max_replicas: 2\n",
            "c.yaml:3: reward.autoscaling.min_replicas (3) is greater than reward.autoscaling.max_replicas (2): "
            "Serve would refuse to deploy. Raise max_replicas or lower min_replicas",
        ),
        ("reward:\n  autoscaling:\n    min_replicas: 2\n    max_replicas: 2\n", None),
        (
            "reward:\n  autoscaling:\n    min_replicas: 0\n    max_replicas: 2\n",
            "c.yaml:3: reward.autoscaling.min_replicas is 0: when scoring pauses Serve may stop every replica",
        ),
        (
            "rollout:\n  num_actors: 5\n  autoscale:\n    max_actors: 4\n",
            "c.yaml:2: rollout.num_actors (5), the pool's size at start, is outside rollout.autoscale's [1, 4]",
        ),
        (
            "rollout:\n  autoscale:\n    min_actors: 3\n    max_actors: 2\n",
            "c.yaml:2: rollout.autoscale: min_actors (3) is greater than max_actors (2)",
        ),
        ("rollout:\n  autoscale:\n    mx_actors: 2\n", "mx_actors"),
        ("rollout:\n  autoscale:\n    max_actors: 8\n", None),
    ],
)
def test_gpu_and_length_settings_are_checked_across_fields(tmp_path, text, needle):
    loads_or_fails_with(tmp_path, text, needle)


@pytest.mark.parametrize(
    "command, needle",
    [
        ("train", "c.yaml:2: model.reward is null and reward.functions is empty: there is nothing to score with"),
        ("serve-reward", "c.yaml:2: model.reward is null and reward.functions is empty"),
        ("sft", None),  # SFT and reward-model training score nothing
        ("train-rm", None),
    ],
)
def test_what_a_command_needs_is_checked_by_the_config(tmp_path, command, needle):
    loads_or_fails_with(tmp_path, "model:\n  reward: null\nlearner:\n  critic: policy\n", needle, command=command)


def test_a_critic_from_a_missing_reward_model_is_refused_before_anything_starts(tmp_path):
    path = write(tmp_path, "model:\n  reward: null\nreward:\n  functions:\n    - function: m:f\n")
    for command in ("config", "train"):
        out = tame(*([command, "show"] if command == "config" else [command]), "--config", str(path))
        assert out.returncode == 2, out.stderr
        assert (
            f"{path}:2: learner.critic is 'reward' (initialised from the reward model), but model.reward "
            "is null" in out.stderr
        )
    load_config(path, ["learner.critic=policy"])  # rule-based rewards only: a fresh value head


def test_a_float16_learner_is_refused_with_exit_2():
    out = tame("config", "show", "--set", "learner.compute_dtype=float16")
    assert out.returncode == 2
    assert "--set learner.compute_dtype: learner.compute_dtype: float16 needs a gradient scaler" in out.stderr


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["ppo.kl.coef"])


def test_a_config_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("run:\n  name: café\n".encode("latin-1"))  # é is one byte, 0xe9, in Latin-1
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:2: not UTF-8 text (byte 0xe9 at offset 16): save the config as UTF-8"
    out = tame("config", "show", "--config", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr


def tame(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_cli_bad_config_exits_2_before_ray(tmp_path):
    path = write(tmp_path, "learner:\n  devise: cpu\n")
    for command in ("train", "sft", "train-rm"):
        out = tame(command, "--config", str(path))
        assert out.returncode == 2, out.stderr
        assert f"{path}:2: learner.devise: unknown key" in out.stderr
        assert "ray" not in out.stderr.lower().replace("tame train-rm", ""), out.stderr


def test_cli_config_show_and_schema(tmp_path):
    path = write(tmp_path, "train:\n  total_updates: 7\n")
    out = tame("config", "show", "--config", str(path), "--set", "ppo.epochs=3")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["train"]["total_updates"] == 7 and shown["ppo"]["epochs"] == 3
    schema = json.loads(tame("config", "schema").stdout)
    assert schema["additionalProperties"] is False
    ppo = schema["$defs"]["PPOConfig"]["properties"]
    # Every field is described, so the schema documents the config.
    assert all("description" in field for field in ppo.values())
    assert ppo["clip_ratio"]["exclusiveMinimum"] == 0.0


@pytest.mark.parametrize(
    "text, needle",
    [
        (
            "ppo:\n  advantage: rloo\n",  # one sample a prompt: nothing to leave out
            "c.yaml:2: ppo.advantage rloo compares the samples of one prompt: rollout.sampling.samples_per_prompt "
            "must be at least 2 (got 1)",
        ),
        ("ppo:\n  advantage: grpo\nrollout:\n  sampling:\n    samples_per_prompt: 1\n", "(got 1)"),
        (
            "ppo:\n  advantage: grpo\nlearner:\n  critic: policy\nrollout:\n  sampling:\n    samples_per_prompt: 4\n",
            "c.yaml:4: learner.critic is set, but ppo.advantage grpo trains no critic",
        ),
        (
            "ppo:\n  advantage: grpo\nrollout:\n  sampling:\n    samples_per_prompt: 3\n",
            "c.yaml:5: train.rollout_batch_size (32) must be a multiple of rollout.sampling.samples_per_prompt (3)",
        ),
        (
            "ppo:\n  advantage: grpo\n  loss_aggregation: token_sum_norm\n  kl:\n    placement: loss\n"
            "rollout:\n  sampling:\n    samples_per_prompt: 4\nmodel:\n  reward: null\nreward:\n  functions:\n"
            "    - function: m:f\n",
            None,
        ),  # no critic: a missing reward model is fine
        ("ppo:\n  advantage: reinforce_pp\n", None),
    ],
)
def test_estimators_are_checked_against_what_they_need(tmp_path, text, needle):
    loads_or_fails_with(tmp_path, text, needle)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("reward:\n  ensemble:\n    aggregation: median\n", "c.yaml:3: reward.ensemble.aggregation: Input should be"),
        ("reward:\n  ensemble:\n    std_cof: 2\n", "c.yaml:3: reward.ensemble.std_cof: unknown key"),
        ("reward:\n  ensemble:\n    std_coef: -1\n", "c.yaml:3: reward.ensemble.std_coef"),
        ("reward_model:\n  members: 0\n", "c.yaml:2: reward_model.members"),
        ("reward:\n  ensemble:\n    aggregation: mean_minus_std\n    std_coef: 0.5\n", None),
    ],
)
def test_reward_ensemble_settings_are_checked(tmp_path, text, needle):
    loads_or_fails_with(tmp_path, text, needle)
