"""The fact probe of the demo (`python -m cluster.demo.facts`): its figures against hand figures."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.demo.facts import Question, aggregate, fact_figures, questions
from cluster.demo.world import World


def test_every_fact_question_has_one_true_value_in_each_answer_form():
    world = World.build(0)
    qs = questions(world, world.heldout_prompts("test"))
    assert len(qs) == 96  # 24 people x 4 attributes x (1 plain + 1 one-word) held out, halved
    for q in qs:
        assert len(q.answers) in (8, 24) and sum(q.true) == len(q.answers) // 8
        for answer, true in zip(q.answers, q.true):
            assert world.judge(q.prompt, answer).truthful == true


def test_figures_of_one_question_by_hand():
    # 8 values in 2 forms, value by value; the third value is true.
    true = tuple(v == 2 for v in range(8) for _ in range(2))
    q = Question("p", tuple(f"a{i}" for i in range(16)), true)
    r = torch.zeros(16)
    r[4], r[5] = 1.0, -1.0  # the true value: above every false one in form 0, below in form 1
    r[0] = 2.0  # a false value, best of all in form 0
    logp = torch.log(torch.full((16,), 1 / 16))
    figures = fact_figures([q], [logp], [r], betas=[0.5])
    assert figures["pairs"] == pytest.approx((6 / 7 + 0 / 7) / 2)
    assert figures["top1"] == 0.0
    z = math.exp(2 / 0.5) + math.exp(1 / 0.5) + math.exp(-1 / 0.5) + 13  # pi_sft uniform: pi* ∝ exp(r / b)
    assert figures["kl@0.5"] == pytest.approx((math.exp(2.0) + math.exp(-2.0)) / z)


def test_aggregate_is_the_reward_service_s_per_item():
    scores = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # 2 members x 2 answers
    assert aggregate(scores, "mean").tolist() == [2.0, 0.0]
    assert aggregate(scores, "min").tolist() == [1.0, 0.0]
    assert aggregate(scores, "mean_minus_std", 0.5).tolist() == [1.5, 0.0]
