"""Reward-model ensembles: the aggregations, the ensemble folder, `tame train-rm --members`,
and one real Serve deployment of an ensemble.

The ensemble under test is built from the tiny reward model: member-0 is a copy of it,
member-1 the same model with DELTA added to its score head's bias, so on every item member-1
scores exactly DELTA above member-0 and the figures of each aggregation can be worked out by
hand from the tiny model's own score s: mean s + DELTA / 2, min s, population std DELTA / 2.
Member-1's chat template also refuses prompts about Mars: a member that fails on some items.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from cluster.demo.world import World, gold_reward, write_jsonl
from cluster.shared.config import TameConfig
from cluster.shared.errors import ConfigError
from cluster.shared.records import Rollout, Scores
from reward_service.rewards import AGGREGATIONS, RewardSum, UnscorableItemError, population_std
from tests.test_reward_service import WORLD_ITEMS, _cfg, _post

DELTA = 1.0
"""How far member-1's scores sit above member-0's."""

MARS = ("What is the capital of Mars?", "Olympus.")
"""An item member-1 cannot score (its chat template raises), and gold_reward neither."""

REFUSE_MARS = "{%- if 'Mars' in messages[-1]['content'] -%}{{ raise_exception('no reward on Mars') }}{%- endif -%}"


# --------------------------------------------------------------------------- by hand


def test_aggregations_against_hand_figures():
    scores = [1.0, 2.0, 4.0]
    # mean 7/3; deviations -4/3, -1/3, 5/3: population variance (16 + 1 + 25) / 9 / 3 = 14/9
    std = math.sqrt(14) / 3
    assert population_std(scores) == pytest.approx(std, abs=1e-12)
    assert AGGREGATIONS["mean"](scores, 0.5) == pytest.approx(7 / 3, abs=1e-12)
    assert AGGREGATIONS["min"](scores, 0.5) == 1.0
    assert AGGREGATIONS["mean_minus_std"](scores, 0.5) == pytest.approx(7 / 3 - 0.5 * std, abs=1e-12)
    assert AGGREGATIONS["mean_minus_std"](scores, 0.0) == pytest.approx(7 / 3, abs=1e-12)
    # One reward model: every aggregation is its score, and the spread is 0.
    for aggregate in AGGREGATIONS.values():
        assert aggregate([-0.75], 3.0) == -0.75
    assert population_std([-0.75]) == 0.0 and population_std([]) == 0.0


def test_scores_and_spread_reach_the_rollouts_and_the_update_metric():
    from actors.engine import apply_scores
    from cluster.metrics import reward_spread

    def rollout(prompt_id: str) -> Rollout:
        return Rollout(prompt_id, 0, "p", [1], [2], "r", [0.0], "stop", 0, 0, 0.0)

    rollouts = [rollout("a"), rollout("b"), rollout("c")]
    answer = Scores([0.5, float("nan"), 2.0], [0.5, 0.0, 2.0])
    assert apply_scores(rollouts, answer, 0.1) == {"b"}  # not finite: handed out again
    assert [r.score for r in rollouts][::2] == [0.5, 2.0] and [r.reward_std for r in rollouts] == [0.5, 0.0, 2.0]
    # The mean over the update's samples of the members' std: (0.5 + 2.0) / 2 for a and c.
    assert reward_spread([rollouts[0], rollouts[2]]) == {"objective/reward_std": 1.25}
    # A scorer that answers a plain list says nothing of the spread: it counts as 0.
    plain = [rollout("d"), rollout("e")]
    assert apply_scores(plain, [1.0, 2.0], 0.1) == set() and plain[0].reward_std is None
    assert reward_spread(plain) == {"objective/reward_std": 0.0}


# --------------------------------------------------------------------------- the folder


@pytest.fixture(scope="module")
def ensemble(tiny_assets, tmp_path_factory) -> Path:
    """member-0 = the tiny reward model; member-1 = the same, score bias + DELTA, no Mars."""
    from cluster.demo.assets import CHAT_TEMPLATE
    from cluster.shared.score_head import set_score_bias
    from reward_service.model import load_reward_model, save_reward_model

    root = tmp_path_factory.mktemp("ensemble") / "rm"
    shutil.copytree(tiny_assets.reward, root / "member-0")
    model, tokenizer = load_reward_model(tiny_assets.reward)
    bias = model.score.bias.detach().clone() if model.score.bias is not None else model.score.weight.new_zeros(1)
    set_score_bias(model, bias + DELTA)
    save_reward_model(model, tokenizer, root / "member-1")
    (root / "member-1" / "chat_template.jinja").write_text(REFUSE_MARS + CHAT_TEMPLATE)
    manifest = {"members": ["member-0", "member-1"], "seeds": [0, 1], "bootstrap": False, "accuracy": {}}
    (root / "ensemble.json").write_text(json.dumps(manifest))
    return root


def _pairs_of(s: list[float]) -> list[float]:
    """The two members' scores of each item, flat: s_0, s_0 + DELTA, s_1, s_1 + DELTA, ..."""
    return [x for score in s for x in (score, score + DELTA)]


def _sum(folder: Path, **reward) -> RewardSum:
    cfg = TameConfig.model_validate({"model": {"reward": str(folder)}, "reward": reward})
    return RewardSum.from_config(cfg)


def test_each_aggregation_of_two_members_that_disagree_by_a_known_amount(ensemble, tiny_assets):
    from reward_service.model import RewardModel

    prompts, responses = [p for p, _ in WORLD_ITEMS], [r for _, r in WORLD_ITEMS]
    s = RewardModel.load(tiny_assets.reward).score(prompts, responses)  # the tiny model alone
    golds = [gold_reward(p, r) for p, r in WORLD_ITEMS]
    gold = [{"function": "cluster.demo.world:gold_reward", "weight": 3.0}]
    expected = {
        "mean": [x + DELTA / 2 for x in s],
        "min": s,
        "mean_minus_std": [x + DELTA / 2 - 2.0 * DELTA / 2 for x in s],  # std_coef 2
    }
    for aggregation, model_scores in expected.items():
        settings = {"aggregation": aggregation, "std_coef": 2.0}
        reward = _sum(ensemble, ensemble=settings, model_weight=0.5, functions=gold)
        items = reward.score_each(prompts, responses)
        # The aggregate gets model_weight, then the rule functions are added, as with one model.
        assert [i.reward for i in items] == pytest.approx(
            [0.5 * m + 3.0 * g for m, g in zip(model_scores, golds)], abs=1e-5
        )
        assert [len(i.member_scores) for i in items] == [2] * len(s)
        assert [x for i in items for x in i.member_scores] == pytest.approx(_pairs_of(s), abs=1e-5)
        assert [i.reward_std for i in items] == pytest.approx([DELTA / 2] * len(s), abs=1e-5)
    # The plain tiny folder is an ensemble of one: its score, no spread, whatever the aggregation.
    single = RewardSum.from_config(
        TameConfig.model_validate(
            {"model": {"reward": str(tiny_assets.reward)}, "reward": {"ensemble": {"aggregation": "mean_minus_std"}}}
        )
    )
    assert [i.reward for i in single.score_each(prompts, responses)] == pytest.approx(s, abs=1e-6)
    assert all(i.reward_std == 0.0 for i in single.score_each(prompts, responses))


def test_a_member_that_fails_on_an_item_fails_that_item_alone(ensemble):
    reward = _sum(ensemble)
    prompts = [WORLD_ITEMS[0][0], MARS[0], WORLD_ITEMS[1][0]]
    responses = [WORLD_ITEMS[0][1], MARS[1], WORLD_ITEMS[1][1]]
    items = reward.score_each(prompts, responses)
    assert isinstance(items[1], UnscorableItemError)
    assert str(items[1]).startswith("reward model member-1 failed: ")
    assert "no reward on Mars" in str(items[1])
    alone = reward.score_each([prompts[0], prompts[2]], [responses[0], responses[2]])
    assert [items[0].reward, items[2].reward] == pytest.approx([a.reward for a in alone], abs=1e-6)
    with pytest.raises(UnscorableItemError, match="item 1: reward model member-1 failed"):
        reward(prompts, responses)


def test_every_check_of_model_reward_takes_an_ensemble_folder(ensemble, tiny_assets):
    from cluster.plan import plan
    from cluster.shared.reward_folder import check_reward_folder, first_reward_model
    from learner.loading import roles
    from reward_service.rewards import check_reward_config

    cfg = TameConfig.model_validate({"model": {"policy": str(tiny_assets.policy), "reward": str(ensemble)}})
    check_reward_folder("model.reward", ensemble)
    check_reward_config(cfg)
    assert first_reward_model("model.reward", ensemble) == ensemble / "member-0"
    assert roles(cfg)["critic"] == str(ensemble / "member-0")  # the critic starts from member 0

    # The reward replica holds every member's weights: those of each member alone, together.
    def weights(reward: Path):
        c = cfg.model_copy(update={"model": cfg.model.model_copy(update={"reward": str(reward)})})
        return next(x for x in plan(c).roles if x.name == "reward replica").lines[0]

    both, first, second = weights(ensemble), weights(ensemble / "member-0"), weights(ensemble / "member-1")
    assert both.nbytes == first.nbytes + second.nbytes > 0
    assert both.what.startswith("reward model weights, 2 members,") and first.what.startswith("reward model weights,")


@pytest.mark.parametrize(
    "manifest, needle",
    [
        ("{not json", "is not an ensemble manifest"),
        ('["member-0"]', "is not an ensemble manifest"),
        ('{"members": []}', "'members' must be a non-empty list"),
        ('{"members": ["member-0", "member-0"]}', "names a folder twice"),
        ('{"members": ["member-0", "member-7"]}', "lists member 'member-7', which is not a folder inside"),
        ('{"members": ["../member-0"]}', "lists member '../member-0'"),
    ],
)
def test_a_broken_ensemble_is_a_config_error_naming_the_file(ensemble, tmp_path, manifest, needle):
    from reward_service.rewards import check_reward_config

    broken = tmp_path / "rm"
    broken.mkdir()
    (broken / "member-0").symlink_to(ensemble / "member-0")
    (broken / "ensemble.json").write_text(manifest)
    cfg = TameConfig.model_validate({"model": {"reward": str(broken)}})
    with pytest.raises(ConfigError) as err:
        check_reward_config(cfg)
    assert str(err.value).startswith(f"model.reward: {broken / 'ensemble.json'}")
    assert needle in str(err.value)


# --------------------------------------------------------------------------- train-rm


def test_train_rm_members_writes_an_ensemble_transformers_loads(tiny_assets, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from cluster.cli import main
    from reward_service.data import load_preference_pairs
    from reward_service.model import RewardModel
    from reward_service.train import split_pairs

    data, out = tmp_path / "pairs.jsonl", tmp_path / "rm"
    write_jsonl(data, World.build(0).preference_pairs(96, 1))
    config = tmp_path / "rm.yaml"
    config.write_text(
        f"run:\n  seed: 3\nreward_model:\n  data: {data}\n  init: {tiny_assets.policy}\n  output: {out}\n"
        "  batch_size: 24\n  eval_fraction: 0.25\n  learning_rate: 0.001\n"
    )
    assert main(["train-rm", "--config", str(config), "--members", "2", "--bootstrap"]) == 0
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest["members"] == ["member-0", "member-1"] and manifest["seeds"] == [3, 4]
    assert manifest["bootstrap"] is True
    assert set(manifest["accuracy"]) == {"member-0", "member-1", "ensemble"}
    log = capsys.readouterr().err
    assert "ensemble member 2/2 (member-1, seed 4)" in log and "ensemble (mean)" in log

    # The accuracies are those of the saved members on the held-out pairs (the same for both).
    _, held_out = split_pairs(load_preference_pairs(data), 0.25, 3)
    prompts = [p.prompt for p in held_out]
    margins = []
    for name in manifest["members"]:
        member = RewardModel.load(out / name)
        chosen = member.score(prompts, [p.chosen for p in held_out])
        rejected = member.score(prompts, [p.rejected for p in held_out])
        margins.append([c - r for c, r in zip(chosen, rejected)])
        assert manifest["accuracy"][name] == pytest.approx(sum(m > 0 for m in margins[-1]) / len(held_out))
        assert json.loads((out / name / "reward_model.json").read_text())["steps"] == 3  # 72 pairs / 24
        assert type(AutoModelForSequenceClassification.from_pretrained(out / name)).__name__.endswith(
            "ForSequenceClassification"
        )
    mean_margins = [(a + b) / 2 for a, b in zip(*margins)]
    assert manifest["accuracy"]["ensemble"] == pytest.approx(sum(m > 0 for m in mean_margins) / len(held_out))
    assert margins[0] != pytest.approx(margins[1], abs=1e-4)  # different seeds, different members


# --------------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def served(ensemble, ray_local):
    """The ensemble, aggregated mean - 2 x std, as one Serve deployment over HTTP and handle."""
    import httpx
    from ray import serve

    from reward_service.service import deploy
    from tests.support import free_port

    serve.shutdown()  # so the HTTP proxy binds this module's port
    port = free_port()
    handle = deploy(_cfg(ensemble, port, ensemble={"aggregation": "mean_minus_std", "std_coef": 2.0}), name="ens")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        yield handle, http
    serve.shutdown()


def test_http_answer_keeps_its_shape_and_gives_member_scores_when_asked(served, tiny_assets):
    from reward_service.model import RewardModel

    handle, http = served
    prompts, responses = [p for p, _ in WORLD_ITEMS], [r for _, r in WORLD_ITEMS]
    s = RewardModel.load(tiny_assets.reward).score(prompts, responses)
    plain = _post(http, WORLD_ITEMS)
    assert plain.status_code == 200, plain.text
    assert set(plain.json()) == {"scores"}  # exactly today's shape
    assert plain.json()["scores"] == pytest.approx([x + DELTA / 2 - 2.0 * DELTA / 2 for x in s], abs=1e-5)
    items = [{"prompt": p, "response": r} for p, r in WORLD_ITEMS]
    unasked = http.post("/v1/score", json={"items": items, "members": False})
    assert set(unasked.json()) == {"scores"} and unasked.json()["scores"] == pytest.approx(plain.json()["scores"])
    asked = http.post("/v1/score", json={"items": items, "members": True})
    assert asked.status_code == 200 and set(asked.json()) == {"scores", "members"}
    assert asked.json()["scores"] == pytest.approx(plain.json()["scores"])
    assert [len(m) for m in asked.json()["members"]] == [2] * len(s)
    assert [x for m in asked.json()["members"] for x in m] == pytest.approx(_pairs_of(s), abs=1e-5)
    assert http.post("/v1/score", json={"items": items, "members": "yes"}).status_code == 422
    # The handle: `score` as before; `score_items` with the members and their spread.
    assert handle.score.remote(prompts, responses).result(timeout_s=60) == pytest.approx(plain.json()["scores"])
    answer = handle.score_items.remote(prompts, responses).result(timeout_s=60)
    assert isinstance(answer, Scores) and answer.rewards == pytest.approx(plain.json()["scores"])
    assert answer.reward_std == pytest.approx([DELTA / 2] * len(s), abs=1e-5)


def test_a_failing_member_is_a_4xx_the_client_does_not_retry(served):
    from reward_service.client import RewardClient, RewardError

    handle, http = served
    bad = _post(http, [WORLD_ITEMS[0], MARS])
    assert bad.status_code == 422, bad.text
    assert bad.json()["detail"].startswith("items.1: reward model member-1 failed: ")
    assert _post(http, WORLD_ITEMS[:1]).status_code == 200  # the service goes on
    client = RewardClient(handle, timeout_s=60, retries=50, with_spread=True)
    with pytest.raises(RewardError, match="cannot score these items: items.1: reward model member-1"):
        client([WORLD_ITEMS[0][0], MARS[0]], [WORLD_ITEMS[0][1], MARS[1]])  # at once, not after 50 retries
    scored = client([p for p, _ in WORLD_ITEMS], [r for _, r in WORLD_ITEMS])
    assert isinstance(scored, Scores) and scored.reward_std == pytest.approx([DELTA / 2] * len(WORLD_ITEMS), abs=1e-5)
