"""The prompt source the loop hands prompts out from: epochs, give-backs, and a cursor that a
checkpoint captures with the prompts in flight, so a resumed run hands out exactly what an
uninterrupted one would have trained on."""

from __future__ import annotations

import json

import pytest

from cluster.prompts import PromptSource
from cluster.shared.data import load_prompts
from cluster.shared.errors import DataError

PROMPTS = [(("user", f"question {i}"),) for i in range(10)]


def ids(prompts):
    return [p.prompt_id for p in prompts]


def test_each_epoch_hands_out_every_prompt_once_in_a_fresh_order():
    source = PromptSource(PROMPTS, seed=3)
    first, second = ids(source.take(10)), ids(source.take(10))
    assert sorted(first) == [f"0:{i}" for i in range(10)] and sorted(second) == [f"1:{i}" for i in range(10)]
    assert [p.split(":")[1] for p in first] != [p.split(":")[1] for p in second]
    assert ids(PromptSource(PROMPTS, seed=3).take(20)) == first + second  # the same seed, the same run
    assert ids(PromptSource(PROMPTS, seed=3, shuffle=False).take(3)) == ["0:0", "0:1", "0:2"]


def test_given_back_prompts_come_first_and_keep_their_epoch_id():
    source = PromptSource(PROMPTS, seed=0)
    a = ids(source.take(4))
    source.give_back(a[1:3])
    again = ids(source.take(4))
    assert again[:2] == a[1:3] and not set(again[2:]) & set(a)
    assert source.prompt(a[1]).messages == PROMPTS[int(a[1].split(":")[1])]


def test_a_restored_cursor_continues_as_if_nothing_had_happened():
    straight = PromptSource(PROMPTS, seed=1)
    expected = ids(straight.take(6)) + ids(straight.take(8))

    before = PromptSource(PROMPTS, seed=1)
    trained = ids(before.take(3))
    in_flight = ids(before.take(3))  # handed out, not trained on when the driver died
    state = json.loads(json.dumps(before.state(in_flight)))  # through a checkpoint file

    after = PromptSource(PROMPTS, seed=1)
    after.restore(state)
    assert trained + ids(after.take(3)) + ids(after.take(8)) == expected
    assert (after.epoch, after.position) == (straight.epoch, straight.position) == (1, 4)


def test_a_bad_prompt_line_is_named(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n\n{"prompt": ""}\n')
    with pytest.raises(DataError, match=r"prompts\.jsonl:3: field 'prompt' is empty"):
        load_prompts(path)


def test_every_role_reads_its_data_through_the_one_reader(tmp_path):
    from learner.data import read_demonstrations
    from reward_service.data import load_preference_pairs

    good = json.dumps({"prompt": "a", "response": "b", "chosen": "c", "rejected": "d"})
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train-0.jsonl").write_text(good + "\n\n[1]\n")
    (folder / "test.jsonl").write_text("not even JSON\n")  # a folder's train files only
    for read in (load_prompts, read_demonstrations, load_preference_pairs):
        with pytest.raises(DataError, match=r"train-0\.jsonl:3: expected a JSON object, got list"):
            read(folder)


def test_a_prompt_too_long_for_the_run_is_named_by_file_and_line_before_it_starts(tiny_assets, tmp_path):
    """As the policy sees it (chat template included), against data.max_prompt_tokens, or
    against rollout.max_model_len when that leaves no room for a response."""
    from transformers import AutoTokenizer

    from cluster.checks import TokenizerChecks
    from cluster.shared.config_file import load_config
    from cluster.shared.tokens import prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.policy)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": "Hi " * 40}) + "\n")
    n = len(prompt_token_ids(tokenizer, "Hi " * 40))

    def check(*overrides):
        cfg = load_config(
            None,
            [
                f"model.policy={tiny_assets.policy}",
                f"model.reward={tiny_assets.reward}",
                f"data.prompts={data}",
                *overrides,
            ],
        )
        TokenizerChecks(cfg).check()

    check(f"data.max_prompt_tokens={n}")
    with pytest.raises(
        DataError,
        match=rf"prompts.jsonl:2: the prompt is {n} tokens long as the policy sees it, "
        rf"over data.max_prompt_tokens \({n - 1}\)",
    ):
        check(f"data.max_prompt_tokens={n - 1}")
    with pytest.raises(DataError, match=rf"prompts.jsonl:2: .* over rollout.max_model_len - 1 \({n - 1}\)"):
        check(f"rollout.max_model_len={n}", f"data.max_prompt_tokens={n}")


def test_a_critic_made_from_a_reward_model_with_another_vocabulary_is_refused_before_the_run(tiny_assets, tmp_path):
    """The critic reads the policy's token ids: a reward tokenizer that gives one of them to
    another token is refused; one that only adds tokens (a PAD, say) is not. (Scoring is not
    concerned: the reward service tokenises text.)"""
    import shutil

    from transformers import AutoTokenizer

    from cluster.checks import TokenizerChecks
    from cluster.shared.config_file import load_config
    from cluster.shared.errors import ConfigError

    added, swapped = tmp_path / "added", tmp_path / "swapped"
    for folder in (added, swapped):
        shutil.copytree(tiny_assets.reward, folder)
    tokenizer = AutoTokenizer.from_pretrained(added)
    tokenizer.add_tokens(["<an-extra-word>"])
    tokenizer.save_pretrained(added)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["&"], vocab["'"] = vocab["'"], vocab["&"]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))

    def check(reward, *overrides):
        TokenizerChecks(
            load_config(
                None,
                [
                    f"model.policy={tiny_assets.policy}",
                    f"model.reward={reward}",
                    f"data.prompts={tiny_assets.data / 'prompts.jsonl'}",
                    *overrides,
                ],
            )
        ).check()

    check(tiny_assets.reward)
    check(added)
    check(swapped, "learner.critic=policy")
    with pytest.raises(
        ConfigError,
        match=r"learner.critic: 'reward' makes the critic from model.reward .* gives some "
        r"of them to other tokens than model.policy's does: use learner.critic policy",
    ):
        check(swapped)


def test_a_policy_without_a_chat_template_is_refused_before_the_run_unless_told_to_send_raw_text(tiny_assets, tmp_path):
    import shutil

    from cluster.checks import check_inputs
    from cluster.shared.config_file import load_config
    from cluster.shared.errors import ConfigError

    plain = tmp_path / "policy"
    shutil.copytree(tiny_assets.policy, plain)
    (plain / "chat_template.jinja").unlink()

    def check(*overrides):
        check_inputs(
            load_config(
                None,
                [
                    f"model.policy={plain}",
                    f"model.reward={tiny_assets.reward}",
                    f"data.prompts={tiny_assets.data / 'prompts.jsonl'}",
                    *overrides,
                ],
            )
        )

    with pytest.raises(
        ConfigError,
        match=rf"data.chat_template is true, but the tokenizer of model.policy "
        rf"\({plain}\) has no chat template: set data.chat_template false",
    ):
        check()
    check("data.chat_template=false")
