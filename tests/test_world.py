"""The synthetic demo world: gold judge on hand-written responses, determinism, the
train/held-out split, and the measured quality of the generated datasets."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from cluster.demo.world import (
    ATTRIBUTE_VALUES,
    INSULTS,
    KIND_WORDS,
    N_ENTITIES,
    NAME_POOL,
    RAMBLES,
    Verdict,
    World,
    demo_datasets,
    gold_reward,
    words,
)


@pytest.fixture(scope="module")
def world() -> World:
    return World.build(0)


def _other(attribute: str, value: str) -> str:
    """A value of `attribute` different from `value`."""
    return next(v for v in ATTRIBUTE_VALUES[attribute] if v != value)


def _v(world: World, prompt: str, response: str) -> tuple[bool, bool, bool]:
    verdict = world.judge(prompt, response)
    return verdict.truthful, verdict.harmless, verdict.helpful


# -- the gold judge, by prompt kind --------------------------------------------------------


def test_verdict_score_is_the_mean_of_the_three_findings():
    assert Verdict(True, True, True).score == 1.0
    assert Verdict(True, False, True).score == pytest.approx(2 / 3)
    assert Verdict(False, True, False).score == pytest.approx(1 / 3)
    assert Verdict(False, False, False).score == 0.0
    assert Verdict(True, True, True).good and not Verdict(True, True, False).good


def test_judge_plain_question(world):
    name = world.entities[0]
    city = world.facts[name]["city"]
    wrong = _other("city", city)
    prompt = f"Where does {name} live?"
    assert _v(world, prompt, f"{name} lives in {city}.") == (True, True, True)
    assert _v(world, prompt, f"{city}.") == (True, True, True)
    # Messy casing, spacing and punctuation do not matter.
    assert _v(world, prompt, f"  {name.upper()} lives in   {city.lower()}!!! \n") == (True, True, True)
    assert _v(world, prompt, f"{name} lives in {wrong}.") == (False, True, True)
    # Hedging between the right value and a wrong one is not truthful.
    assert _v(world, prompt, f"{name} lives in {city} or {wrong}.") == (False, True, True)
    # Insults, plural insults included, make it harmful but leave it truthful and helpful.
    assert _v(world, prompt, f"{name} lives in {city}, you idiot.") == (True, False, True)
    assert _v(world, prompt, f"Only fools ask. {name} lives in {city}.") == (True, False, True)
    # Mentioning the subject without answering is neither truthful nor helpful.
    assert _v(world, prompt, f"{name} is a person.") == (False, True, False)
    assert _v(world, prompt, "I would rather talk about the weather today.") == (False, True, False)
    # A correct answer drowned in rambling (13 words > 12) is unhelpful; 12 words pass.
    long = f"{name} lives in {city} and that is all I want to say now."
    assert len(words(long)) == 13
    assert _v(world, prompt, long.replace(" now", "")) == (True, True, True)
    assert _v(world, prompt, long) == (True, True, False)


def test_judge_wrong_fact_about_another_attribute_is_untruthful(world):
    name = world.entities[1]
    facts = world.facts[name]
    prompt = f"Where does {name} live?"
    assert _v(world, prompt, f"{name} the {facts['job']} lives in {facts['city']}.") == (True, True, True)
    wrong_job = _other("job", facts["job"])
    assert _v(world, prompt, f"{name} the {wrong_job} lives in {facts['city']}.") == (False, True, True)


def test_judge_one_word_question(world):
    name = world.entities[2]
    food = world.facts[name]["food"]
    wrong = _other("food", food)
    for prompt in (
        f"Answer in one word: What does {name} like to eat?",
        f"What does {name} like to eat? Reply with one word only.",
    ):
        assert _v(world, prompt, f"{food.capitalize()}.") == (True, True, True)
        assert _v(world, prompt, f"{food.upper()}!!!") == (True, True, True)
        assert _v(world, prompt, f" {food}\n") == (True, True, True)
        assert _v(world, prompt, f"{wrong.capitalize()}.") == (False, True, True)
        # The constraint broken: right fact, not one word.
        assert _v(world, prompt, f"{name} loves to eat {food}.") == (True, True, False)
        assert _v(world, prompt, f"{food}, fool.") == (True, False, False)
        # One word, but not an answer to the question.
        assert _v(world, prompt, "Hello.") == (False, True, False)
        assert _v(world, prompt, "") == (False, True, False)


def test_judge_kind_sentence(world):
    name = world.entities[3]
    facts = world.facts[name]
    prompt = f"Say something kind about {name}."
    assert _v(world, prompt, f"{name} is a kind {facts['job']}.") == (True, True, True)
    assert _v(world, prompt, f"{name.lower()} is LOVELY and brave") == (True, True, True)
    # A kind sentence with a wrong fact in it is untruthful but still helpful.
    assert _v(world, prompt, f"{name} is a kind {_other('job', facts['job'])}.") == (False, True, True)
    assert _v(world, prompt, f"Everyone in {_other('city', facts['city'])} says {name} is great.") == (
        False,
        True,
        True,
    )
    # An insult instead of kindness: harmful, and no kind word so the request is not met.
    assert _v(world, prompt, f"{name} is a stupid {facts['job']}.") == (True, False, False)
    assert _v(world, prompt, f"{name} is kind but lazy.") == (True, False, True)
    # Negated kindness, a missing subject, and off-topic talk are unhelpful.
    assert _v(world, prompt, f"{name} is not kind.") == (True, True, False)
    assert _v(world, prompt, "You are kind and clever.") == (True, True, False)
    assert _v(world, prompt, RAMBLES[0]) == (True, True, False)


def test_judge_finds_the_prompt_inside_other_text(world):
    name = world.entities[0]
    city = world.facts[name]["city"]
    prompt = f"Where does {name} live?"
    expected = world.judge(prompt, f"{city}.")
    assert world.judge(f"  where DOES {name.lower()}   live? ", f"{city}.") == expected
    assert world.judge(f"<|user|>\n{prompt}\n<|assistant|>\n", f"{city}.") == expected
    # The longest contained prompt wins: the one-word version, not the plain question.
    wrapped = f"<|user|>Answer in one word: {prompt}<|assistant|>"
    assert world.spec(wrapped).kind == "one_word"
    with pytest.raises(KeyError):
        world.judge("What is the capital of France?", "Paris.")


def test_gold_reward_is_the_seed_zero_judge_score(world):
    name = world.entities[0]
    city = world.facts[name]["city"]
    prompt = f"Where does {name} live?"
    assert gold_reward(prompt, f"{name} lives in {city}.") == 1.0
    assert gold_reward(prompt, f"{name} lives in {city}, fool.") == pytest.approx(2 / 3)
    assert gold_reward(prompt, "Let me tell you about trains, fool.") == 0.0


# -- determinism and the split ------------------------------------------------------------


def test_same_seed_same_world_and_data_different_seed_different():
    a, b, c = World.build(3), World.build(3), World.build(4)
    assert a.facts == b.facts and a.train_prompts() == b.train_prompts()
    assert a.heldout_prompts() == b.heldout_prompts()
    assert a.sft_examples(200, 1) == b.sft_examples(200, 1)
    assert a.preference_pairs(200, 1) == b.preference_pairs(200, 1)
    assert a.corpus_lines() == b.corpus_lines()
    assert a.facts != c.facts
    assert a.train_prompts() != c.train_prompts()
    assert a.sft_examples(200, 1) != a.sft_examples(200, 2)


def test_train_and_heldout_are_disjoint_new_combinations(world):
    train, heldout = world.train_prompts(), world.heldout_prompts()
    # N_ENTITIES people x (4 attributes x (4 questions x 3 constraints) + 6 kind requests).
    assert len(world.entities) == N_ENTITIES
    assert len(train) + len(heldout) == N_ENTITIES * (4 * 12 + 6)
    assert len(heldout) == N_ENTITIES * (4 * 2 + 2)
    assert not set(train) & set(heldout)
    train_specs = [world.spec(p) for p in train]
    train_templates = {s.template for s in train_specs}
    train_facts = {(s.entity, s.attribute) for s in train_specs}
    train_people = {s.entity for s in train_specs}
    for prompt in heldout:
        spec = world.spec(prompt)
        assert spec.template in train_templates  # the phrasing is known...
        assert spec.entity in train_people
        if spec.attribute is not None:
            assert (spec.entity, spec.attribute) in train_facts  # ...and so is the fact.
    kinds = [world.spec(p).kind for p in heldout]
    assert kinds.count("question") == kinds.count("one_word") == N_ENTITIES * 4
    assert kinds.count("kind") == N_ENTITIES * 2


def test_the_heldout_prompts_halve_into_validation_and_test_alike_in_people_and_kinds(world):
    validation, test = world.heldout_prompts("validation"), world.heldout_prompts("test")
    assert sorted(validation + test) == sorted(world.heldout_prompts())
    assert not set(validation) & set(test)
    assert validation == World.build(0).heldout_prompts("validation")  # fixed by the seed
    for half in (validation, test):
        counts = Counter((world.spec(p).entity, world.spec(p).kind) for p in half)
        # Per person: 2 of the 4 held-out questions, 2 of the 4 one-word ones, 1 of the 2 kinds.
        assert counts == {(e, k): n for e in world.entities for k, n in (("question", 2), ("one_word", 2), ("kind", 1))}
    with pytest.raises(ValueError, match="validation"):
        world.heldout_prompts("dev")


# -- generated data -------------------------------------------------------------------------


def test_every_flawless_response_is_judged_good(world):
    rng = random.Random(0)
    for prompt in world.train_prompts() + world.heldout_prompts():
        for _ in range(3):
            response = world.respond(prompt, rng)
            assert world.judge(prompt, response).good, (prompt, response)


@pytest.mark.parametrize(
    "flaw,finding",
    [
        ("wrong_fact", "truthful"),
        ("insult", "harmless"),
        ("ramble", "helpful"),
    ],
)
def test_each_flaw_breaks_its_finding(world, flaw, finding):
    rng = random.Random(1)
    for prompt in world.train_prompts()[:300]:
        response = world.respond(prompt, rng, (flaw,))
        assert not getattr(world.judge(prompt, response), finding), (prompt, response)


def test_ignoring_the_one_word_constraint_is_unhelpful_but_truthful(world):
    rng = random.Random(2)
    one_word = [p for p in world.train_prompts() if world.spec(p).kind == "one_word"]
    for prompt in one_word[:100]:
        assert _v(world, prompt, world.respond(prompt, rng, ("ignore_constraint",))) == (True, True, False)


def test_sft_bad_share_is_in_the_intended_range(world):
    rows = world.sft_examples(4000, rng_seed=0)
    assert all(r["prompt"] in set(world.train_prompts()) for r in rows)
    verdicts = [world.judge(r["prompt"], r["response"]) for r in rows]
    bad = sum(not v.good for v in verdicts) / len(rows)
    assert 0.27 <= bad <= 0.37
    # Every kind of failure is present in a useful amount.
    for finding in ("truthful", "harmless", "helpful"):
        assert sum(not getattr(v, finding) for v in verdicts) / len(rows) > 0.08
    # Every fact is demonstrated correctly, so held-out questions are answerable.
    demonstrated = set()
    for row, verdict in zip(rows, verdicts):
        spec = world.spec(row["prompt"])
        if spec.attribute is not None and verdict.good:
            demonstrated.add((spec.entity, spec.attribute))
    assert len(demonstrated) == N_ENTITIES * 4


def test_responses_are_short(world):
    rows = world.sft_examples(2000, rng_seed=5)
    lengths = [len(words(r["response"])) for r in rows]
    assert max(lengths) <= 18 and sum(lengths) / len(lengths) < 7


def test_preference_pairs_carry_truth_signal(world):
    # The reward model can only learn to reward truth from pairs whose gold labels differ
    # in truthfulness: a good answer against one with a wrong fact is the commonest pair.
    pairs = world.preference_pairs(2000, rng_seed=0, label_noise=0.0)
    truth = sum(
        world.judge(r["prompt"], r["chosen"]).truthful and not world.judge(r["prompt"], r["rejected"]).truthful
        for r in pairs
    ) / len(pairs)
    harm = sum(not world.judge(r["prompt"], r["rejected"]).harmless for r in pairs) / len(pairs)
    assert truth > 0.5 and harm > 0.25


def test_preference_pairs_agree_with_the_judge_up_to_label_noise(world):
    def agreement(pairs):
        return sum(
            world.judge(p["prompt"], p["chosen"]).score > world.judge(p["prompt"], p["rejected"]).score for p in pairs
        ) / len(pairs)

    pairs = world.preference_pairs(2000, rng_seed=0, label_noise=0.1)
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert all(
        world.judge(p["prompt"], p["chosen"]).score != world.judge(p["prompt"], p["rejected"]).score for p in pairs
    )
    assert agreement(pairs) == pytest.approx(0.9, abs=0.025)
    assert agreement(world.preference_pairs(500, rng_seed=0, label_noise=0.0)) == 1.0
    with pytest.raises(ValueError):
        world.preference_pairs(10, rng_seed=0, label_noise=0.7)


def test_corpus_covers_every_word_of_the_data(world):
    corpus = set()
    for line in world.corpus_lines():
        corpus.update(words(line))
    used = set()
    for prompt in world.train_prompts() + world.heldout_prompts():
        used.update(words(prompt))
    for row in world.sft_examples(4000, rng_seed=11):
        used.update(words(row["response"]))
    for row in world.preference_pairs(3000, rng_seed=11):
        used.update(words(row["chosen"]) + words(row["rejected"]))
    assert used <= corpus, used - corpus


def test_vocabulary_is_unambiguous():
    values = [v.lower() for vs in ATTRIBUTE_VALUES.values() for v in vs]
    assert len(values) == len(set(values))  # a word names at most one value
    names = {n.lower() for n in NAME_POOL}
    assert len(names) == len(NAME_POOL)
    assert not names & (set(values) | INSULTS | set(KIND_WORDS))
    for ramble in RAMBLES:
        ws = set(words(ramble.format(name="Anna")))
        assert not ws & (set(values) | INSULTS | set(KIND_WORDS))


def test_demo_datasets_writes_the_four_files(tmp_path, world):
    paths = demo_datasets(tmp_path / "data", seed=0)
    assert sorted(paths) == ["heldout", "preferences", "prompts", "sft"]
    rows = {k: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] for k, p in paths.items()}
    assert [r["prompt"] for r in rows["prompts"]] == world.train_prompts()
    assert [r["prompt"] for r in rows["heldout"]] == world.heldout_prompts()
    assert len(rows["sft"]) >= 2000 and set(rows["sft"][0]) == {"prompt", "response"}
    assert len(rows["preferences"]) >= 2000 and set(rows["preferences"][0]) == {"prompt", "chosen", "rejected"}
