"""The learner on the tiny assets: micro-batching, gradients, PPO learning, weights
publication into a real vLLM engine, checkpoints and resume, non-finite updates.

Rollouts are sampled with transformers (learner.sampling); vLLM is used once, for the
published-weights check."""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from actors.weights import engine_probes, load_into_engine, loads_directly
from cluster.shared.config_file import load_config
from cluster.shared.errors import NonFiniteUpdatesError
from cluster.shared.records import Rollout
from cluster.shared.transport import ObjectStoreTransport, compare_probes, probes_of
from learner.learner import Learner
from learner.sampling import sample_rollouts
from tests.support import bfloat16_copy, lm_head_outputs

# Every update publishes the version it makes into the object store: a local Ray for all.
pytestmark = pytest.mark.usefixtures("ray_local")

REWARDED = range(10, 512)
"""Token ids the fixed test reward likes: roughly half of the tiny vocabulary."""


def make_cfg(assets, *overrides: str):
    return load_config(
        None,
        [
            f"model.policy={assets.policy}",
            f"model.reward={assets.reward}",
            "learner.num_cpus=2",
            "run.seed=0",
            "rollout.sampling.max_new_tokens=10",
            "train.rollout_batch_size=16",
            "ppo.minibatch_size=8",
            "ppo.micro_batch_size=4",
            "ppo.learning_rate=0.002",
            "ppo.critic_learning_rate=0.002",
            *overrides,
        ],
    )


def prompts(assets, n: int, start: int = 0) -> list[str]:
    lines = (assets.data / "prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[start : start + n]]


def fixed_reward(rollouts: list[Rollout]) -> list[Rollout]:
    """Score = share of response tokens in REWARDED."""
    for r in rollouts:
        r.score = sum(t in REWARDED for t in r.response_token_ids) / len(r.response_token_ids)
    return rollouts


def sample(learner: Learner, texts: list[str], seed: int) -> list[Rollout]:
    return fixed_reward(
        sample_rollouts(
            learner.policy,
            learner.tokenizer,
            texts,
            learner.cfg.rollout.sampling.max_new_tokens,
            learner.temperature,
            seed=seed,
            policy_version=learner.version(),
        )
    )


@torch.no_grad()
def rewarded_mass(learner: Learner, rollouts: list[Rollout]) -> float:
    """Expected reward per token: the policy's probability mass on REWARDED at every
    response position of fixed rollouts (teacher-forced, so no sampling noise)."""
    exp = learner.tokens(rollouts, truncate=False)
    logits = learner.policy(input_ids=exp.input_ids, attention_mask=exp.attention_mask).logits
    probs = torch.softmax(logits[:, :-1].float() / learner.temperature, dim=-1)
    mass = probs[..., REWARDED.start : REWARDED.stop].sum(-1)
    return float((mass * exp.mask).sum() / exp.mask.sum())


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def gradients(learner: Learner) -> dict[str, torch.Tensor]:
    """The .grad of every policy and critic parameter, by "policy.<name>" / "critic.<name>"."""
    return {
        f"{model}.{n}": p.grad.clone()
        for model in ("policy", "critic")
        for n, p in getattr(learner, model).named_parameters()
    }


# --------------------------------------------------------------------------- gradients


def test_micro_batches_give_the_same_loss_and_gradients(tiny_assets, tmp_path):
    learner = Learner(make_cfg(tiny_assets, "ppo.entropy_coef=0.01"), str(tmp_path))
    rollouts = sample(learner, prompts(tiny_assets, 8), seed=1)
    exp, _ = learner.prepare(rollouts)
    rows = torch.arange(8)

    whole = learner.accumulate_gradients(exp, rows, micro_batch_size=8)
    grads_whole = gradients(learner)
    learner._zero_grad()
    quarters = learner.accumulate_gradients(exp, rows, micro_batch_size=2)
    grads_quarters = gradients(learner)

    for key in ("loss", "policy", "value", "entropy", "clipfrac", "ratio"):
        assert quarters[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
    assert whole["ratio"] == pytest.approx(1.0, abs=1e-6)  # before any step: pi == pi_prox
    assert grads_whole.keys() == grads_quarters.keys()
    for name, g in grads_whole.items():
        torch.testing.assert_close(grads_quarters[name], g, rtol=1e-4, atol=1e-7, msg=name)
    assert sum(float(g.abs().sum()) for g in grads_whole.values()) > 0

    # Gradient checkpointing recomputes the layers in the backward pass: the same gradients.
    recomputing = Learner(
        make_cfg(tiny_assets, "ppo.entropy_coef=0.01", "learner.gradient_checkpointing=true"),
        str(tmp_path / "recompute"),
    )
    assert recomputing.policy.is_gradient_checkpointing and recomputing.critic.is_gradient_checkpointing
    recomputed = recomputing.accumulate_gradients(exp, rows, micro_batch_size=8)
    assert recomputed["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    for name, g in gradients(recomputing).items():
        torch.testing.assert_close(g, grads_whole[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("advantage", ["gae", "grpo", "rloo", "reinforce_pp"])
def test_every_estimator_and_aggregation_gives_the_same_loss_and_gradients_in_micro_batches(
    tiny_assets, tmp_path, advantage
):
    """Two prompts of four samples each, the KL in the loss: one micro-batch of 8 and four of
    2 give the same loss and gradients, for every estimator and loss aggregation. Without
    GAE the learner holds no critic."""
    cfg = make_cfg(
        tiny_assets,
        f"ppo.advantage={advantage}",
        "rollout.sampling.samples_per_prompt=4",
        "ppo.kl.placement=loss",
        "ppo.entropy_coef=0.01",
    )
    learner = Learner(cfg, str(tmp_path))
    assert (learner.critic is None) == (advantage != "gae")
    rollouts = sample(learner, [t for t in prompts(tiny_assets, 2) for _ in range(4)], seed=1)
    for i, r in enumerate(rollouts):
        r.prompt_id = f"0:{i // 4}"
    exp, metrics = learner.prepare(rollouts)
    assert ("val/mean" in metrics) == (advantage == "gae")
    rows = torch.arange(8)
    models = [m for m in (learner.policy, learner.critic) if m is not None]
    for aggregation in ("token_mean", "sequence_mean", "token_sum_norm"):
        learner.cfg = cfg.model_copy(update={"ppo": cfg.ppo.model_copy(update={"loss_aggregation": aggregation})})
        results = []
        for micro_batch_size in (8, 2):
            stats = learner.accumulate_gradients(exp, rows, micro_batch_size)
            results.append(
                (stats, {f"{i}.{n}": p.grad.clone() for i, m in enumerate(models) for n, p in m.named_parameters()})
            )
            learner._zero_grad()
        (whole, grads_whole), (quarters, grads_quarters) = results
        assert ("value" in whole) == (advantage == "gae") and "kl" in whole
        for key in whole:
            assert quarters[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), (aggregation, key)
        for name, g in grads_whole.items():
            torch.testing.assert_close(grads_quarters[name], g, rtol=1e-4, atol=1e-7, msg=f"{aggregation} {name}")
        assert sum(float(g.abs().sum()) for g in grads_whole.values()) > 0


def test_critic_free_advantages_follow_the_groups(tiny_assets, tmp_path):
    """GRPO and RLOO advantages, from the learner's own experience, sum to zero over each
    prompt's samples (RLOO exactly; GRPO up to its std scale), per token equal within a sequence."""
    for advantage in ("grpo", "rloo"):
        learner = Learner(
            make_cfg(
                tiny_assets, f"ppo.advantage={advantage}", "rollout.sampling.samples_per_prompt=4", "ppo.kl.coef=0"
            ),
            str(tmp_path / advantage),
        )
        rollouts = sample(learner, [t for t in prompts(tiny_assets, 2) for _ in range(4)], seed=3)
        for i, r in enumerate(rollouts):
            r.prompt_id = f"0:{i // 4}"
            r.score = float(i % 4)  # 0, 1, 2, 3 in each group
        exp, _ = learner.prepare(rollouts)
        per_sequence = (exp.advantages * exp.mask).sum(1) / exp.mask.sum(1)
        expected = {
            "grpo": torch.tensor([-1.5, -0.5, 0.5, 1.5]) / torch.tensor([0.0, 1, 2, 3]).std(),
            "rloo": torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0]),
        }[advantage]
        torch.testing.assert_close(per_sequence, expected.repeat(2), rtol=1e-4, atol=1e-5)


def test_the_learner_trains_with_the_hand_tested_functions(tiny_assets):
    """`logprobs.response_logprobs` (every PPO and SFT forward, the actors' reference) gives, on the tiny policy,
    what ppo's hand-tested functions give on the model's full logits."""
    from transformers import AutoModelForCausalLM

    from cluster.shared.logprobs import entropy_from_logits, logprobs_from_logits, response_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_assets.policy, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 40, 12, 99, 3], [8, 21, 33, 7, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0, 0.0]])[:, 1:]  # offset 1
    with torch.no_grad():
        logp, entropy = response_logprobs(model, ids, attention, mask, 1, 0.7, with_entropy=True)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, 1:-1]  # predicting ids[:, 2:]
    torch.testing.assert_close(logp, logprobs_from_logits(logits, ids[:, 2:], 0.7) * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, entropy_from_logits(logits, 0.7) * mask, atol=1e-5, rtol=0)
    assert float(logp[mask.bool()].max()) < 0 and float((logp * (1 - mask)).abs().sum()) == 0.0


def test_only_response_tokens_receive_gradient(tiny_assets, tmp_path):
    learner = Learner(make_cfg(tiny_assets, "ppo.entropy_coef=0.01"), str(tmp_path))
    rollouts = sample(learner, prompts(tiny_assets, 4, start=20), seed=2)
    exp, _ = learner.prepare(rollouts)
    with lm_head_outputs(learner.policy) as captured:
        learner.accumulate_gradients(exp, torch.arange(4), micro_batch_size=4)
    (logits,) = captured  # (B, window + 1, V): the positions the LM head saw
    window = exp.select(torch.arange(4))
    touched = logits.grad.abs().sum(-1)[:, :-1] > 0  # (B, W)
    # Exactly the positions that predict a response token get gradient; prompt and
    # padding positions get none (and the last position, which predicts nothing).
    assert torch.equal(touched, window.mask.bool())
    assert float(logits.grad[:, -1].abs().sum()) == 0.0
    # The prompt positions the window cut off were never sent through the LM head at all.
    assert logits.shape[1] < exp.batch.input_ids.shape[1]


@pytest.mark.parametrize("epochs", [1, 2])
def test_the_fused_first_pass_trains_exactly_like_the_separate_proximal_pass(tiny_assets, tmp_path, epochs):
    """One micro-batch per update: the first epoch's forward pass stands in for the proximal
    no-grad pass. Weights, critic and every metric come out as with the separate pass."""
    results = []
    for fuse in (True, False):
        learner = Learner(
            make_cfg(
                tiny_assets,
                "ppo.minibatch_size=16",
                "ppo.micro_batch_size=16",
                f"ppo.epochs={epochs}",
                "ppo.entropy_coef=0.01",
            ),
            str(tmp_path / str(fuse)),
        )
        learner.fuse_first_pass = fuse
        metrics = learner.update(sample(learner, prompts(tiny_assets, 16), seed=1)).metrics
        results.append((metrics, params(learner.policy), params(learner.critic)))
    (fused, policy_a, critic_a), (separate, policy_b, critic_b) = results
    assert fused["learner/fused_first_pass"] == 1.0 and separate["learner/fused_first_pass"] == 0.0
    for a, b in ((policy_a, policy_b), (critic_a, critic_b)):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    for key in fused:
        if not key.startswith(("perf/", "learner/fused")):
            assert fused[key] == pytest.approx(separate[key], rel=1e-6, abs=1e-6), key
    assert any(
        not torch.equal(policy_a[n], p)
        for n, p in params(Learner(make_cfg(tiny_assets), str(tmp_path / "fresh")).policy).items()
    )


@pytest.mark.parametrize("micro_batch, temperature", [(4, 1.0), (16, 0.7)])
def test_reference_logprobs_from_the_actors_train_exactly_like_the_learners_own_pass(
    tiny_assets, tmp_path, micro_batch, temperature
):
    """`rollout.reference_logprobs`: the actors' reference (`actors.reference`) computes the
    learner's numbers, so a learner holding no reference model and fed them trains to the
    same weights and metrics; without them it refuses the batch by naming the setting."""
    import copy

    from actors.reference import Reference

    overrides = (
        "ppo.minibatch_size=16",
        f"ppo.micro_batch_size={micro_batch}",
        "ppo.kl.coef=0.5",
        "ppo.truncate_at_stop=true",
        f"rollout.sampling.temperature={temperature}",
    )
    own = Learner(make_cfg(tiny_assets, *overrides), str(tmp_path / "own"))
    cfg = make_cfg(tiny_assets, *overrides, "rollout.reference_logprobs=true")
    fed = Learner(cfg, str(tmp_path / "fed"))
    reference = Reference(cfg, fed.pad_id)
    assert own.reference is not None and fed.reference is None
    for update in range(2):  # the second trains away from the reference: a KL to compute
        rollouts = sample(own, prompts(tiny_assets, 16, start=40 + 16 * update), seed=3 + update)
        annotated = copy.deepcopy(rollouts)
        reference.annotate(annotated)
        assert [len(r.reference_logprobs) for r in annotated] == [len(r.response_token_ids) for r in rollouts]
        ours = own.update(rollouts).metrics
        theirs = fed.update(annotated).metrics
        for key in ours:
            if not key.startswith("perf/"):
                assert theirs[key] == ours[key], key
        for name, p in params(own.policy).items():
            assert torch.equal(p, params(fed.policy)[name]), name
    assert ours["objective/kl"] > 0
    with pytest.raises(ValueError, match="rollout.reference_logprobs"):
        fed.update(rollouts)


def test_bfloat16_compute_trains_float32_weights_that_learn_at_small_learning_rates(tiny_assets, tmp_path):
    """learner.compute_dtype bfloat16 runs the passes under autocast; weights and AdamW states
    stay float32, so one update at lr 1e-6 (the rate of configs/gpu.yaml, below bfloat16's
    resolution) still moves the weights, and its figures match the float32 update's."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        learner = Learner(
            make_cfg(
                tiny_assets,
                f"learner.compute_dtype={dtype}",
                "ppo.learning_rate=1e-6",
                "ppo.critic_learning_rate=1e-6",
                "ppo.minibatch_size=16",
            ),
            str(tmp_path / dtype),
        )
        before = params(learner.policy)
        metrics = learner.update(sample(learner, prompts(tiny_assets, 16), seed=1)).metrics
        after = params(learner.policy)
        states = [s for s in learner.optimizers["policy"].state.values()]
        assert {p.dtype for p in after.values()} == {torch.float32}
        assert {s["exp_avg"].dtype for s in states} == {torch.float32}
        runs[dtype] = metrics, {n: after[n] != before[n] for n in after}
    (full, full_changed), (mixed, mixed_changed) = runs["float32"], runs["bfloat16"]
    # Every weight with a gradient moves; the embedding rows of tokens absent from the batch
    # have none, in either precision.
    embedding = "model.embed_tokens.weight"
    rest = [n for n in mixed_changed if n != embedding]
    share = sum(int(mixed_changed[n].sum()) for n in rest) / sum(mixed_changed[n].numel() for n in rest)
    assert share > 0.99, share
    assert torch.equal(mixed_changed[embedding], full_changed[embedding])
    for key in ("loss/total_avg", "loss/value_avg", "objective/kl", "val/mean", "policy/entropy_avg"):
        assert mixed[key] == pytest.approx(full[key], rel=0.05, abs=0.02), key
    # The gap to the sampler's float32 log-probs is what autocast costs, and it is reported.
    assert full["val/logp_gap_fresh_mean"] < 1e-5 < mixed["val/logp_gap_fresh_mean"] < 0.05


def test_a_bfloat16_reference_costs_half_and_gives_the_float32_weights_log_probs(tiny_assets, tmp_path):
    """Under bfloat16 autocast the frozen reference stores its linear layers in bfloat16, the
    dtype autocast computes them in, and keeps embeddings and norms in float32: its log-probs
    are the float32 policy's bit for bit at version 0 (the KL starts at exactly 0)."""
    learner = Learner(make_cfg(tiny_assets, "learner.compute_dtype=bfloat16"), str(tmp_path))
    linear = {f"{name}.weight" for name, m in learner.reference.named_modules() if isinstance(m, torch.nn.Linear)}
    dtypes = {name: p.dtype for name, p in learner.reference.named_parameters()}
    assert linear and {dtypes[n] for n in linear} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if n not in linear} == {torch.float32}
    assert not any(p.requires_grad for p in learner.reference.parameters())
    batch = learner.tokens(sample(learner, prompts(tiny_assets, 8), seed=2))
    ref, old, _ = learner._no_grad_passes(batch)
    assert torch.equal(ref, old)
    assert learner.update(sample(learner, prompts(tiny_assets, 16), seed=3)).metrics["objective/kl"] == 0.0


# --------------------------------------------------------------------------- learning


def test_ppo_updates_raise_the_rewarded_behaviour(tiny_assets, tmp_path):
    learner = Learner(
        make_cfg(tiny_assets, "ppo.kl.coef=0.01", "ppo.epochs=2", "ppo.learning_rate=0.01"), str(tmp_path)
    )
    held_out = sample(learner, prompts(tiny_assets, 16, start=100), seed=99)
    before = rewarded_mass(learner, held_out)
    first = None
    for update in range(6):
        batch = sample(learner, prompts(tiny_assets, 16, start=16 * update), seed=update)
        result = learner.update(batch)
        assert not result.skipped and result.version == update + 1
        assert result.metrics["learner/skipped_nonfinite"] == 0.0
        metrics = result.metrics
        first = first or metrics
    after = rewarded_mass(learner, held_out)

    assert learner.version() == 6
    assert after > before + 0.04, (before, after)  # measured: 0.555 -> 0.644
    # First minibatch of the first epoch: pi is exactly the proximal policy.
    assert first["val/ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert first["val/ratio"] != pytest.approx(1.0, abs=1e-6)  # later minibatches moved
    # Rollouts sampled from the learner's own weights: behaviour == proximal.
    assert first["rollout/max_abs_logp_delta"] < 1e-4
    assert first["rollout/behaviour_kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at v0
    assert first["learner/optimizer_steps"] == 4  # 2 epochs x 16 / 8
    expected = {
        "objective/kl",
        "objective/entropy",
        "objective/scores",
        "objective/rlhf_reward",
        "objective/non_score_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/ratio",
        "val/num_eos_tokens",
        "rollout/behaviour_kl",
        "rollout/max_abs_logp_delta",
        "rollout/is_weight_mean",
        "perf/update_seconds",
        "learner/kl_coef",
        "learner/lr",
    }
    assert expected <= metrics.keys()
    assert metrics["objective/kl"] != 0.0  # the policy has left the reference

    # The KL figures by hand: per sequence, the k1 and k3 sums over its response tokens;
    # logged, their batch means and their largest sequences.
    exp, metrics = learner.prepare(sample(learner, prompts(tiny_assets, 16, start=200), seed=7))
    log_ratio = (exp.old_logprobs - exp.ref_logprobs).double()
    k1 = (log_ratio * exp.mask).sum(1)
    k3 = ((torch.exp(-log_ratio) - 1 + log_ratio) * exp.mask).sum(1)
    assert metrics["objective/kl"] == pytest.approx(float(k1.mean()), rel=1e-4, abs=1e-6)
    assert metrics["objective/kl_max"] == pytest.approx(float(k1.max()), rel=1e-4, abs=1e-6)
    assert metrics["objective/kl_k3"] == pytest.approx(float(k3.mean()), rel=1e-4, abs=1e-6)
    assert metrics["objective/kl_k3_max"] == pytest.approx(float(k3.max()), rel=1e-4, abs=1e-6)
    assert metrics["objective/kl_k3"] > 0


def test_critic_from_the_policy_starts_at_zero(tiny_assets, tmp_path):
    learner = Learner(make_cfg(tiny_assets, "learner.critic=policy"), str(tmp_path))
    exp, metrics = learner.prepare(sample(learner, prompts(tiny_assets, 4), seed=3))
    assert metrics["val/mean"] == 0.0
    assert float(exp.old_values.abs().max()) == 0.0
    result = learner.update(sample(learner, prompts(tiny_assets, 8), seed=4))
    assert not result.skipped and result.version == learner.version() == 1


def test_critic_from_the_reward_model_is_the_reward_model_score_bias_included(tiny_assets, tmp_path):
    from cluster.shared.score_head import set_score_bias
    from reward_service.model import load_reward_model, save_reward_model

    # A reward model whose scores training normalised by shifting its head's bias.
    reward, tokenizer = load_reward_model(tiny_assets.reward)
    set_score_bias(reward, 1.5)
    save_reward_model(reward, tokenizer, tmp_path / "reward")
    learner = Learner(
        make_cfg(tiny_assets, "learner.critic=reward", f"model.reward={tmp_path / 'reward'}"), str(tmp_path / "run")
    )
    assert learner.critic.score.bias.item() == 1.5
    critic, want = learner.critic.state_dict(), reward.state_dict()
    assert critic.keys() == want.keys()
    assert all(torch.equal(critic[k], want[k]) for k in want)


def test_ptx_term_trains_on_demonstrations(tiny_assets, tmp_path):
    lines = (tiny_assets.data / "sft.jsonl").read_text().splitlines()[:6]
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("\n".join(lines) + "\n")
    learner = Learner(make_cfg(tiny_assets, "ppo.ptx_coef=1.0", f"ppo.ptx_data={ptx}"), str(tmp_path / "run"))
    assert len(learner.ptx_examples) == 6
    losses = [
        learner.update(sample(learner, prompts(tiny_assets, 16, start=16 * i), seed=30 + i)).metrics["loss/ptx_avg"]
        for i in range(3)
    ]
    # Two minibatches of 8 demonstrations per update, cycling through the 6: 48 % 6 = 0.
    assert learner.ptx_cursor == 0
    assert losses[-1] < losses[0] - 0.1, losses  # starts near ln(1024) ~ 6.9


def test_the_ptx_term_is_the_demonstrations_nll_at_temperature_1_whatever_the_sampling_temperature(
    tiny_assets, tmp_path
):
    from learner.data import collate_demonstrations
    from learner.training import demonstration_nll

    lines = (tiny_assets.data / "sft.jsonl").read_text().splitlines()[:6]
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("\n".join(lines) + "\n")
    learner = Learner(
        make_cfg(
            tiny_assets,
            "ppo.ptx_coef=1.0",
            f"ppo.ptx_data={ptx}",
            "ppo.minibatch_size=16",
            "rollout.sampling.temperature=0.5",
        ),
        str(tmp_path / "run"),
    )
    rollouts = sample(learner, prompts(tiny_assets, 16), seed=5)
    demos = [learner.ptx_examples[i % 6] for i in range(16)]  # one minibatch of 16, cycling the 6
    with torch.no_grad():
        want = float(demonstration_nll(learner.policy, *collate_demonstrations(demos, learner.pad_id, learner.device)))
    assert learner.update(rollouts).metrics["loss/ptx_avg"] == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- publication


def test_an_update_publishes_its_version_and_a_skipped_one_publishes_nothing(tiny_assets, tmp_path):
    """One call trains and publishes: the result carries the new version's handle, holding the
    trained weights, and `publish` afterwards hands back that same handle. A skipped update
    carries none, and the published version stays the last good one."""
    learner = Learner(make_cfg(tiny_assets), str(tmp_path))
    initial = learner.publish()
    assert initial.version == 0 and learner.publish() is initial
    rollouts = sample(learner, prompts(tiny_assets, 16), seed=5)

    result = learner.update(rollouts)
    assert not result.skipped and result.weights is not None
    assert result.weights.version == result.version == learner.version() == 1
    assert learner.publish() is result.weights  # once per version: the update's own
    assert result.metrics["perf/publish_seconds"] > 0
    published, trained = ObjectStoreTransport.fetch(result.weights), params(learner.policy)
    assert published.keys() == trained.keys() and all(torch.equal(published[n], trained[n]) for n in trained)
    before = ObjectStoreTransport.fetch(initial)
    assert any(not torch.equal(before[n], published[n]) for n in published)

    bad = [Rollout(**{**r.__dict__}) for r in rollouts]
    bad[0].score = float("nan")
    skipped = learner.update(bad)
    assert skipped.skipped and skipped.weights is None and skipped.version == 1
    assert learner.publish() is result.weights


# --------------------------------------------------------------------------- non-finite updates


def test_nonfinite_updates_are_skipped_counted_and_finally_fatal(tiny_assets, ray_local, tmp_path):
    learner = Learner(
        make_cfg(tiny_assets, "learner.max_nonfinite_updates=2", "ppo.minibatch_size=2", "ppo.micro_batch_size=2"),
        str(tmp_path),
    )
    rollouts = sample(learner, prompts(tiny_assets, 8), seed=5)
    weights = params(learner.policy)

    bad_score = [Rollout(**{**r.__dict__}) for r in rollouts]
    bad_score[3].score = float("nan")
    result = learner.update(bad_score)
    assert result.skipped and result.version == learner.version() == 0
    assert result.metrics["learner/skipped_nonfinite"] == 1.0
    assert learner.publish().version == 0

    # A NaN behaviour log-prob reaches the loss through the IS weight: found at that
    # minibatch's gradients, after earlier minibatches stepped (seed 0 puts row 6 in the
    # last of four minibatches), so the update is undone.
    learner.nonfinite_in_row = 0
    bad_logp = [Rollout(**{**r.__dict__}) for r in rollouts]
    bad_logp[6].behaviour_logprobs = [float("nan")] * len(bad_logp[6].response_token_ids)
    optimizer_state = learner.optimizers["policy"].state_dict()["state"]
    result = learner.update(bad_logp)
    assert result.skipped and result.version == learner.version() == 0
    for name, p in learner.policy.named_parameters():
        assert torch.equal(p, weights[name]), name
    assert learner.optimizers["policy"].state_dict()["state"] == optimizer_state == {}

    good = learner.update(rollouts)
    assert not good.skipped and good.version == learner.version() == 1
    assert good.metrics["learner/nonfinite_total"] == 2.0 and learner.nonfinite_in_row == 0

    # Undone once AdamW has moments: they come back from the host snapshot bit for bit, as do
    # the weights, the learning rates and the schedules.
    weights, moments = params(learner.policy), copy.deepcopy(learner.optimizers["policy"].state_dict())
    schedule = learner.schedulers["critic"].state_dict()
    steps, step = [], learner.optimizers["policy"].step
    learner.optimizers["policy"].step = lambda *a, **k: steps.append(1) or step(*a, **k)
    assert learner.update(bad_logp).skipped
    assert steps, "the NaN row came in the first minibatch: nothing was undone"
    learner.nonfinite_in_row = 0
    for name, p in learner.policy.named_parameters():
        assert torch.equal(p, weights[name]), name
    after = learner.optimizers["policy"].state_dict()
    assert after["param_groups"] == moments["param_groups"]
    for index, state in moments["state"].items():
        assert all(torch.equal(after["state"][index][k], v) for k, v in state.items()), index
    assert learner.schedulers["critic"].state_dict() == schedule
    learner.update(bad_score)
    with pytest.raises(NonFiniteUpdatesError, match="max_nonfinite_updates = 2"):
        learner.update(bad_score)


# --------------------------------------------------------------------------- checkpoints


def test_resume_gives_the_same_weights(tiny_assets, tmp_path):
    cfg = make_cfg(
        tiny_assets,
        "ppo.epochs=2",
        "ppo.minibatch_size=4",
        "ppo.micro_batch_size=2",
        "ppo.kl.adaptive=true",
        "ppo.lr_schedule=linear",
        "ppo.warmup_steps=2",
        "train.total_updates=4",
        "learner.keep_checkpoints=2",
    )
    sampler = Learner(cfg, str(tmp_path / "sampler"))
    batches = [sample(sampler, prompts(tiny_assets, 8, start=8 * i), seed=10 + i) for i in range(4)]

    straight = Learner(cfg, str(tmp_path / "straight"))
    for batch in batches:
        straight.update(batch)

    first = Learner(cfg, str(tmp_path / "resumed"))
    assert first.load_checkpoint() is None
    for batch in batches[:2]:
        first.update(batch)
        first.save_checkpoint({"cursor": first.version()})
    path = Path(first.save_checkpoint({"cursor": 2, "samples": 16}))
    del first
    # A save that died half-way leaves a hidden temporary folder: never picked up.
    (path.parent / ".tmp-version-000099-crashed" / "policy").mkdir(parents=True)

    resumed = Learner(cfg, str(tmp_path / "resumed"))
    assert resumed.load_checkpoint() == {"cursor": 2, "samples": 16}
    assert resumed.version() == 2
    for batch in batches[2:]:
        resumed.update(batch)

    for model in ("policy", "critic"):
        a, b = params(getattr(straight, model)), params(getattr(resumed, model))
        for name in a:
            assert torch.equal(a[name], b[name]), (model, name)
    assert resumed.kl_controller.value == straight.kl_controller.value != cfg.ppo.kl.coef
    assert resumed.schedulers["policy"].get_last_lr() == straight.schedulers["policy"].get_last_lr()

    # Layout, pruning (keep 2), and HF loadability of what was written.
    names = sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("."))
    assert names == ["version-000001", "version-000002"]
    assert {p.name for p in path.iterdir()} >= {"policy", "critic", "trainer_state.pt"}
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(path / "policy")
    AutoModelForSequenceClassification.from_pretrained(path / "critic")
    assert AutoTokenizer.from_pretrained(path / "policy").eos_token_id == straight.eos_id
    reloaded = params(policy)
    assert any(not torch.equal(reloaded[n], p) for n, p in params(straight.policy).items())


def test_a_checkpoint_from_before_sharded_checkpoints_still_resumes(tiny_assets, tmp_path):
    """The layout tame wrote before `sharded/`: Hugging Face weights, and the optimizer
    states inside trainer_state.pt."""
    import shutil

    cfg = make_cfg(tiny_assets)
    first = Learner(cfg, str(tmp_path / "old"))
    first.update(sample(first, prompts(tiny_assets, 16), seed=5))
    path = Path(first.save_checkpoint({"cursor": 1}))
    shutil.rmtree(path / "sharded")
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    del state["optimizers"]
    state.update(
        policy_optimizer=first.optimizers["policy"].state_dict(),
        critic_optimizer=first.optimizers["critic"].state_dict(),
    )
    torch.save(state, path / "trainer_state.pt")

    resumed = Learner(cfg, str(tmp_path / "old"))
    assert resumed.load_checkpoint() == {"cursor": 1}
    batch = sample(first, prompts(tiny_assets, 16, start=16), seed=6)
    first.update(batch)
    resumed.update(batch)
    for model in ("policy", "critic"):
        a, b = params(getattr(first, model)), params(getattr(resumed, model))
        assert all(torch.equal(a[n], b[n]) for n in a), model


@pytest.mark.parametrize("layout", ["sharded", "whole"])
def test_a_critic_saved_before_critics_kept_the_score_bias_resumes_without_one(tiny_assets, tmp_path, layout):
    """A checkpoint whose critic, made from a reward model with a score bias, lost that bias
    (as before critics kept it) computed without one: it resumes so, bias 0, from either
    checkpoint layout."""
    import shutil

    from cluster.shared.score_head import set_score_bias
    from reward_service.model import load_reward_model, save_reward_model

    reward, tokenizer = load_reward_model(tiny_assets.reward)
    set_score_bias(reward, 1.5)
    save_reward_model(reward, tokenizer, tmp_path / "biased")
    old = Learner(make_cfg(tiny_assets), str(tmp_path / "run"))  # the tiny reward model has no bias
    old.update(sample(old, prompts(tiny_assets, 16), seed=5))
    path = Path(old.save_checkpoint({"cursor": 1}))
    if layout == "whole":  # as in test_a_checkpoint_from_before_sharded_checkpoints_still_resumes
        shutil.rmtree(path / "sharded")
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        del state["optimizers"]
        state.update(
            policy_optimizer=old.optimizers["policy"].state_dict(),
            critic_optimizer=old.optimizers["critic"].state_dict(),
        )
        torch.save(state, path / "trainer_state.pt")

    resumed = Learner(make_cfg(tiny_assets, f"model.reward={tmp_path / 'biased'}"), str(tmp_path / "run"))
    assert resumed.critic.score.bias.item() == 1.5
    assert resumed.load_checkpoint() == {"cursor": 1}
    assert resumed.critic.score.bias.item() == 0.0
    before, after = params(old.critic), params(resumed.critic)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not resumed.update(sample(old, prompts(tiny_assets, 16, start=16), seed=6)).skipped


def test_a_critic_free_learner_resumes_a_gae_checkpoint_without_its_critic(tiny_assets, tmp_path):
    gae = Learner(make_cfg(tiny_assets), str(tmp_path))
    gae.update(sample(gae, prompts(tiny_assets, 16), seed=5))
    gae.save_checkpoint({"cursor": 1})
    grpo = Learner(make_cfg(tiny_assets, "ppo.advantage=grpo", "rollout.sampling.samples_per_prompt=4"), str(tmp_path))
    assert grpo.critic is None and grpo.load_checkpoint() == {"cursor": 1}
    a, b = params(gae.policy), params(grpo.policy)
    assert all(torch.equal(a[n], b[n]) for n in a)
    moments = [
        (s["exp_avg"], t["exp_avg"])
        for s, t in zip(gae.optimizers["policy"].state.values(), grpo.optimizers["policy"].state.values(), strict=True)
    ]
    assert moments and all(torch.equal(x, y) for x, y in moments)


def test_the_export_is_in_the_dtype_of_the_model_the_run_started_from(tiny_assets, tmp_path):
    """A bfloat16 policy trains float32 master weights and is exported in bfloat16, its
    config.json saying so: `from_pretrained(dtype="auto")` gives the learner's weights rounded
    to bfloat16. The critic, from the float32 reward model, is exported in float32; both resume
    from `sharded/` as float32, exactly."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = make_cfg(tiny_assets, f"model.policy={bfloat16_copy(tiny_assets.policy, tmp_path / 'bf16')}")
    learner = Learner(cfg, str(tmp_path / "run"))
    assert learner.policy.dtype == torch.float32
    learner.update(sample(learner, prompts(tiny_assets, 16), seed=5))
    path = Path(learner.save_checkpoint({"cursor": 1}))

    assert json.loads((path / "policy" / "config.json").read_text())["dtype"] == "bfloat16"
    policy = AutoModelForCausalLM.from_pretrained(path / "policy", dtype="auto")
    assert policy.dtype == torch.bfloat16
    got, trained = params(policy), params(learner.policy)
    assert got.keys() == trained.keys() and all(torch.equal(got[n], trained[n].to(torch.bfloat16)) for n in got)
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in trained.values())  # rounded indeed
    critic = AutoModelForSequenceClassification.from_pretrained(path / "critic", dtype="auto")
    assert critic.dtype == torch.float32
    got, trained = params(critic), params(learner.critic)
    assert got.keys() == trained.keys() and all(torch.equal(got[n], trained[n]) for n in got)

    resumed = Learner(cfg, str(tmp_path / "run"))
    assert resumed.load_checkpoint() == {"cursor": 1}
    for model in ("policy", "critic"):
        a, b = params(getattr(learner, model)), params(getattr(resumed, model))
        assert all(torch.equal(a[n], b[n]) for n in a), model


def test_a_checkpoint_written_in_the_background_holds_the_staged_state_and_resumes_bit_for_bit(tiny_assets, tmp_path):
    """learner.async_checkpoints: `save_checkpoint` returns once the state is staged and the
    learner trains on while a thread writes it. Until it is in place no reader sees it, only a
    hidden folder; what lands is the version saved, not the weights trained since; a learner
    resumed from it trains the next batch to the same bits; the next save waits for it and then
    prunes it (keep 1)."""
    from transformers import AutoModelForCausalLM

    from learner.checkpoints import complete

    cfg = make_cfg(
        tiny_assets,
        "learner.async_checkpoints=true",
        "learner.keep_checkpoints=1",
        "ppo.kl.adaptive=true",
        "ppo.lr_schedule=linear",
        "train.total_updates=3",
    )
    sampler = Learner(cfg, str(tmp_path / "sampler"))
    batches = [sample(sampler, prompts(tiny_assets, 16, start=16 * i), seed=40 + i) for i in range(2)]
    run = tmp_path / "run"

    first = Learner(cfg, str(run))
    first.update(batches[0])
    saved = params(first.policy)
    # The writing thread is held until the learner has trained on, so that the update below
    # changes the weights while the checkpoint of version 1 is still being written.
    hold = threading.Event()
    first.checkpoint_writer._thread.submit(hold.wait)
    path = Path(first.save_checkpoint({"cursor": 1}))
    first.update(batches[1])
    assert complete(run) == [] and [p.name[: len(".tmp-version-000001-")] for p in path.parent.iterdir()] == [
        ".tmp-version-000001-"
    ]
    hold.set()
    assert first.wait_for_checkpoint() == str(path) and complete(run) == [path]
    assert [p.name for p in path.parent.iterdir()] == [path.name]

    exported = params(AutoModelForCausalLM.from_pretrained(path / "policy"))
    assert all(torch.equal(exported[n], saved[n]) for n in saved)
    resumed = Learner(cfg, str(run))
    assert resumed.load_checkpoint() == {"cursor": 1} and resumed.version() == 1
    resumed.update(batches[1])
    for model in ("policy", "critic"):
        a, b = params(getattr(first, model)), params(getattr(resumed, model))
        assert all(torch.equal(a[n], b[n]) for n in a), model
    assert resumed.kl_controller.value == first.kl_controller.value

    newer = Path(first.save_checkpoint({"cursor": 2}))
    assert first.wait_for_checkpoint() == str(newer) and complete(run) == [newer]
    assert [p.name for p in path.parent.iterdir()] == [newer.name]


def test_a_checkpoint_that_fails_in_the_background_raises_at_the_next_save_and_leaves_nothing(
    tiny_assets, tmp_path, monkeypatch
):
    """A background write that fails (here its final rename, as on a full disk) is raised by
    the next save, which stages nothing; no folder, hidden or not, is left; the save after
    that writes the checkpoint again."""
    from learner import checkpoints

    learner = Learner(make_cfg(tiny_assets, "learner.async_checkpoints=true"), str(tmp_path))

    def full_disk(tmp, final):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "move_into_place", full_disk)
    path = Path(learner.save_checkpoint({"cursor": 0}))
    with pytest.raises(OSError, match="No space left on device"):
        learner.save_checkpoint({"cursor": 0})
    assert list(path.parent.iterdir()) == []
    monkeypatch.undo()
    assert learner.save_checkpoint({"cursor": 0}) == str(path) and learner.wait_for_checkpoint() == str(path)
    assert checkpoints.complete(tmp_path) == [path] and list(path.parent.iterdir()) == [path]


# --------------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module")
def vllm_engine(tiny_assets, tmp_path_factory):
    """One in-process vLLM engine on a checkpoint the learner wrote (version 0)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    run = tmp_path_factory.mktemp("vllm-run")
    cfg = make_cfg(tiny_assets, "rollout.sampling.temperature=0.8")
    checkpoint = Learner(cfg, str(run)).save_checkpoint({})
    llm = LLM(
        model=str(Path(checkpoint) / "policy"),
        dtype="float32",
        max_model_len=256,
        seed=0,
        enforce_eager=True,
        logprobs_mode="processed_logprobs",
    )
    yield llm, cfg, Path(checkpoint) / "policy"


def vllm_rollouts(llm, tokenizer, texts: list[str], temperature: float, max_tokens: int):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from cluster.shared.tokens import prompt_token_ids

    ids = [prompt_token_ids(tokenizer, t) for t in texts]
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0, seed=7)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
    rollouts = []
    for n, (prompt, out) in enumerate(zip(ids, outputs)):
        o = out.outputs[0]
        logps = [step[token].logprob for step, token in zip(o.logprobs, o.token_ids)]
        rollouts.append(
            Rollout(str(n), 0, texts[n], prompt, list(o.token_ids), o.text, logps, o.finish_reason, 0, 0, 0.0)
        )
    return rollouts


def test_published_weights_load_into_vllm_and_match_the_learner(vllm_engine, tiny_assets, tmp_path, ray_local):
    llm, cfg, on_disk = vllm_engine
    learner = Learner(cfg, str(tmp_path))
    for i in range(2):
        learner.update(sample(learner, prompts(tiny_assets, 16, start=16 * i), seed=20 + i))
    handle = learner.publish()
    assert handle.version == 2 and learner.publish() is handle  # once per version

    texts = prompts(tiny_assets, 12, start=200)
    stale = vllm_rollouts(llm, learner.tokenizer, texts, learner.temperature, 10)
    stale_gap = max(
        abs(a - b) for r, lp in zip(stale, learner.logprobs(stale)) for a, b in zip(r.behaviour_logprobs, lp)
    )
    assert stale_gap > 1e-2  # the engine still runs version 0

    state = ObjectStoreTransport.fetch(handle)
    published = ObjectStoreTransport.probes(handle)
    recomputed = probes_of(state.items())
    assert published.keys() == recomputed.keys() == {n for n, _ in learner.policy.named_parameters()}
    check = compare_probes(recomputed, published)  # equal up to float32 summation order
    assert check.ok and check.rms_error < 1e-6, check
    assert handle.nbytes == sum(t.numel() * t.element_size() for t in state.values())
    # The rollout actors' own load, both ways: vLLM's reload (GPUs), then the direct one (CPU).
    for direct, path in [(False, "vllm"), (loads_directly(llm, on_disk), "direct")]:
        assert load_into_engine(llm, state, direct) == path
        measured, fused = engine_probes(llm)
        assert compare_probes(measured, published, fused, exact={n for n, t in state.items() if t.dim() <= 1}).ok

        fresh = vllm_rollouts(llm, learner.tokenizer, texts, learner.temperature, 10)
        gaps = [abs(a - b) for r, lp in zip(fresh, learner.logprobs(fresh)) for a, b in zip(r.behaviour_logprobs, lp)]
        assert len(gaps) > 50
        assert max(gaps) < 1e-4, path


def test_a_response_spanning_two_versions_is_corrected_token_by_token():
    """A response whose first tokens version 3 sampled and the rest version 4 (weights loaded
    while it was generated): each position keeps the log-prob of the weights that sampled its
    token, so the importance weight of each token is against its own behaviour; the record
    counts as made by its oldest version, so it is not fresh for a learner at version 4."""
    from learner import ppo
    from learner.experience import tokenize

    def record(versions, logprobs):
        return Rollout(
            "p", 0, "q", [5, 6, 7], [8, 9, 10, 11], "", logprobs, "length", min(versions), 0, 0.0, score=1.0,
            token_versions=versions,
        )  # fmt: skip

    spanning = record([3, 3, 4, 4], [-1.0, -2.0, -0.5, -0.25])
    batch = tokenize([spanning, record([4] * 4, [-1.0] * 4)], 0, 2, False, 4, torch.device("cpu"))
    assert batch.fresh.tolist() == [False, True]
    behaviour = batch.behaviour_logprobs[0][batch.mask[0] > 0]
    assert behaviour.tolist() == [-1.0, -2.0, -0.5, -0.25]
    proximal = torch.tensor([-1.5, -1.0, -0.5, -1.25])
    weights = ppo.truncated_importance_weight(proximal, behaviour, cap=2.0)
    assert weights.tolist() == pytest.approx([0.60653, 2.0, 1.0, 0.36788], abs=1e-5)
