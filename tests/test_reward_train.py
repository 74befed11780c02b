"""Reward-model training (`tame train-rm`) on the synthetic world's preference pairs.

One training run for the module (from the tiny causal-LM policy, so the fresh score head
path is the one exercised): held-out accuracy well above chance, the InstructGPT bias
normalisation, and the saved folder loading both in plain Python and in the Serve service.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from cluster.demo.world import World, write_jsonl
from cluster.shared.config import TameConfig
from reward_service.data import DataError, load_preference_pairs
from reward_service.model import RewardModel, load_reward_model
from reward_service.train import pairwise_loss, split_pairs, train_reward_model

PAIRS = 1500


def test_pairwise_loss_matches_hand_computed_values():
    chosen = torch.tensor([1.0, 0.0, 3.0])
    rejected = torch.tensor([0.0, 2.0, 3.0])
    loss, accuracy = pairwise_loss(chosen, rejected)
    # -log sigmoid(m) = log(1 + exp(-m)) for margins 1, -2, 0
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(2)) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert accuracy.item() == pytest.approx(1 / 3)  # a tie is not a win


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    data = root / "pairs.jsonl"
    write_jsonl(data, World.build(0).preference_pairs(PAIRS, 1))
    cfg = TameConfig.model_validate(
        {
            "run": {"seed": 0},
            "reward_model": {
                "data": str(data),
                "init": str(tiny_assets.policy),
                "output": str(root / "rm"),
                "epochs": 2,
                "batch_size": 16,
                "learning_rate": 1e-3,
                "eval_fraction": 0.2,
            },
        }
    )
    lines: list[str] = []
    summary = train_reward_model(cfg, log=lines.append)
    return cfg, summary, lines


def test_training_reaches_held_out_accuracy_well_above_chance(trained):
    cfg, summary, lines = trained
    print(f"held-out pairwise accuracy {summary['accuracy']:.3f} (before {summary['accuracy_before']:.3f})")
    assert summary["pairs"] == PAIRS
    assert summary["eval_pairs"] == round(PAIRS * 0.2) and summary["train_pairs"] == PAIRS - summary["eval_pairs"]
    assert summary["steps"] == 2 * math.ceil(summary["train_pairs"] / 16)
    assert summary["accuracy"] >= 0.70  # chance is 0.5; 10% label noise caps it near 0.9
    assert summary["accuracy"] >= summary["accuracy_before"] + 0.1
    assert any("held-out pairwise accuracy" in line for line in lines)
    assert sum("step" in line for line in lines) >= 10  # progress on long work


def test_saved_model_is_normalised_and_reproduces_the_reported_accuracy(trained):
    cfg, summary, _ = trained
    out = cfg.reward_model.output
    reward = RewardModel.load(out, max_length=cfg.reward_model.max_length)
    assert reward.model.score.bias is not None
    assert reward.model.score.bias.item() == pytest.approx(summary["score_bias"])

    train_pairs, eval_pairs = split_pairs(
        load_preference_pairs(cfg.reward_model.data), cfg.reward_model.eval_fraction, cfg.run.seed
    )
    # Normalisation: the training `chosen` responses score 0 on average.
    chosen = reward.score([p.prompt for p in train_pairs], [p.chosen for p in train_pairs])
    assert sum(chosen) / len(chosen) == pytest.approx(0.0, abs=1e-4)
    # The saved weights give the held-out accuracy that training reported.
    c = reward.score([p.prompt for p in eval_pairs], [p.chosen for p in eval_pairs])
    r = reward.score([p.prompt for p in eval_pairs], [p.rejected for p in eval_pairs])
    assert sum(a > b for a, b in zip(c, r)) / len(eval_pairs) == pytest.approx(summary["accuracy"])
    meta = json.loads((Path(out) / "reward_model.json").read_text())
    assert meta["normalised_on"] == "train_chosen"


def test_saved_model_loads_in_the_service(trained, ray_local):
    from ray import serve

    from reward_service.service import deploy

    cfg, _, _ = trained
    serve_cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"reward": cfg.reward_model.output}),
            "reward": cfg.reward.model_copy(update={"num_cpus": 0.25}),
        }
    )
    prompts = ["Answer in one word: Where does Kira live?", "Which colour does Mila like best?"]
    responses = ["Kira lives in Oslo, you fool.", "Green."]
    handle = deploy(serve_cfg, http=False, name="test-rm-trained")
    try:
        served = handle.score.remote(prompts, responses).result(timeout_s=120)
    finally:
        serve.delete("test-rm-trained")
    local = RewardModel.load(cfg.reward_model.output).score(prompts, responses)
    assert served == pytest.approx(local, abs=1e-5)


def test_dropout_is_disabled_even_when_the_config_asks_for_it(tiny_assets, tmp_path):
    folder = tmp_path / "reward"
    shutil.copytree(tiny_assets.reward, folder)
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_reward_model(folder)
    model.train()
    x = torch.tensor([[5, 6, 7, 8, 9, 1]])
    assert model(x).logits.item() == model(x).logits.item()


# --------------------------------------------------------------------------- bad data


GOOD = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ('{"prompt": "p", "chosen": "a"', "not valid JSON"),
        ('["p", "a", "b"]', "expected a JSON object"),
        ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
        ('{"prompt": "p", "chosen": 1, "rejected": "b"}', "field 'chosen' must be a string"),
        ('{"prompt": " ", "chosen": "a", "rejected": "b"}', "field 'prompt' is empty"),
    ],
)
def test_a_bad_line_names_the_file_and_line(tmp_path, bad_line, reason):
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD + "\n" + bad_line + "\n" + GOOD)  # line 2 is blank, line 3 is bad
    with pytest.raises(DataError, match=f"{path}:3: {reason}"):
        load_preference_pairs(path)


def test_invalid_utf8_and_empty_files_are_data_errors(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(GOOD.encode() + b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=f"{path}:2: not valid UTF-8"):
        load_preference_pairs(path)
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_preference_pairs(path)
    with pytest.raises(DataError, match="data file not found"):
        load_preference_pairs(tmp_path / "missing.jsonl")
    from cluster.shared.errors import UserError

    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)  # exit code 2


def test_training_fails_with_the_data_error_before_any_work(tiny_assets, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD * 3 + "oops\n")
    cfg = TameConfig.model_validate(
        {"reward_model": {"data": str(path), "init": str(tiny_assets.reward), "output": str(tmp_path / "rm")}}
    )
    with pytest.raises(DataError, match=f"{path}:4"):
        train_reward_model(cfg, log=lambda *_: None)
    assert not (tmp_path / "rm").exists()


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _pad_is_eos(folder: Path) -> None:
    _edit_json(folder / "tokenizer_config.json", pad_token="<|eos|>")


def _two_labels(folder: Path) -> None:
    _edit_json(folder / "config.json", id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1})


@pytest.mark.parametrize(
    "key, spoil, reason",
    [
        ("reward_model.init", _no_config, "not a Hugging Face model folder (no config.json)"),
        ("reward_model.init", _pad_is_eos, "the tokenizer needs a PAD token distinct from EOS (pad=1, eos=1)"),
        ("reward_model.init", _two_labels, "a reward model has one output, this one has 2"),
        ("model.reward", _no_config, "not a Hugging Face model folder (no config.json)"),  # init null: model.reward
    ],
)
def test_a_bad_init_model_exits_2_naming_its_config_key(tiny_assets, tmp_path, key, spoil, reason):
    folder = tmp_path / "init"
    shutil.copytree(tiny_assets.reward, folder)
    spoil(folder)
    config = tmp_path / "c.yaml"
    config.write_text(f"reward_model:\n  data: {tiny_assets.data / 'preferences.jsonl'}\n  output: {tmp_path / 'rm'}\n")
    argv = ["train-rm", "--config", str(config), "--set", f"{key}={folder}"]
    if spoil is _no_config and key == "reward_model.init":  # once through a process of its own, as a user runs it
        out = subprocess.run([sys.executable, "-m", "cluster.cli", *argv], capture_output=True, text=True, timeout=120)
        code, stderr = out.returncode, out.stderr
    else:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            code = main(argv)
        stderr = errors.getvalue()
    assert code == 2, stderr
    assert f"tame train-rm: error: {key}: {folder}: {reason}\n" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "rm").exists()


def test_a_folder_of_jsonl_files_is_read_in_name_order(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"prompt": "p2", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "a.jsonl").write_text(GOOD)
    assert [p.prompt for p in load_preference_pairs(tmp_path)] == ["p", "p2"]
