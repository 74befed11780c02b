"""A second model family end to end: Qwen2, with what sets it apart from the Llama assets
(biases on q/k/v, which vLLM fuses into one qkv_proj with the weights; grouped-query
attention, so q, k and v have different widths; an untied LM head; its own tokenizer class),
through the real components: the offline assets, a rollout actor's vLLM engine, one learner
update with a critic made from the Qwen2 reward model, a published version loaded into the
engine and verified by its probes, and the learner's checkpoints.

One engine for the module (an engine costs seconds to build on CPU), and it is built from the
policy export of the learner's first checkpoint (version 0): that it comes up and samples the
log-probs transformers computes is the check that vLLM loads what the learner writes. The
chain, each link a fixture: learner at version 0 and its checkpoint -> actor on that export,
which generates the batch the learner trains on -> version 1, published and checkpointed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cluster.shared.config_file import load_config
from cluster.shared.records import Prompt
from cluster.shared.tokens import prompt_token_ids, response_token_ids
from cluster.shared.transport import ObjectStoreTransport, compare_probes, probes_of
from tests.support import hf_logprobs

BIASED = ("q_proj", "k_proj", "v_proj")


def make_cfg(assets, policy: Path | None = None):
    """The learner's and the actor's config on the Qwen2 assets (the actor's on `policy`)."""
    return load_config(
        None,
        [
            f"model.policy={policy or assets.policy}",
            f"model.reward={assets.reward}",
            "run.seed=0",
            "learner.num_cpus=2",
            "learner.keep_checkpoints=3",
            "rollout.num_cpus=1",
            "rollout.max_model_len=256",
            "rollout.kv_cache_gib=0.25",
            "rollout.sampling.max_new_tokens=12",
            "train.rollout_batch_size=16",
            "ppo.minibatch_size=8",
            "ppo.micro_batch_size=8",
            "ppo.learning_rate=0.002",
            "ppo.critic_learning_rate=0.002",
        ],
    )


def prompts(assets, n: int, start: int = 0) -> list[Prompt]:
    lines = (assets.data / "prompts.jsonl").read_text().splitlines()[start : start + n]
    return [Prompt(f"0:{start + i}", (("user", json.loads(line)["prompt"]),)) for i, line in enumerate(lines)]


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def safetensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def max_logprob_gap(rollouts, logprobs: list[list[float]]) -> tuple[float, int]:
    """Largest |behaviour - other| log-prob over the tokens of the rollouts, and the tokens compared."""
    gaps = [
        abs(a - b)
        for r, lp in zip(rollouts, logprobs, strict=True)
        for a, b in zip(r.behaviour_logprobs, lp, strict=True)
    ]
    return max(gaps), len(gaps)


def load_with_vllms_reload(actor, tensors: dict) -> None:
    """Inside a rollout actor (`__ray_call__`): load through vLLM's reload, the path on GPUs."""
    from actors.weights import load_into_engine

    assert load_into_engine(actor._llm, tensors, direct=False) == "vllm"


@pytest.fixture(scope="module")
def qwen2_assets(tmp_path_factory):
    from cluster.demo.assets import ensure_assets

    return ensure_assets(
        tmp_path_factory.mktemp("assets") / "qwen2-tiny", "tiny", seed=0, log=lambda *_: None, family="qwen2"
    )


@pytest.fixture(scope="module")
def start(qwen2_assets, tmp_path_factory):
    """The learner at version 0, what its models held then, and its checkpoint of version 0."""
    from learner.learner import Learner

    learner = Learner(make_cfg(qwen2_assets), str(tmp_path_factory.mktemp("qwen2-run")))
    return SimpleNamespace(
        learner=learner,
        policy=params(learner.policy),
        critic=params(learner.critic),
        checkpoint=Path(learner.save_checkpoint({})),
    )


@pytest.fixture(scope="module")
def actor(start, qwen2_assets, ray_local):
    """A rollout actor whose engine was built from the version-0 checkpoint's policy export,
    and the batch it generated before any test loaded other weights."""
    from ray import cloudpickle

    from actors.rollout import RolloutActor

    # Helpers run inside the actor (`__ray_call__`) travel by value: the worker cannot import this module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    handle = ray_local.remote(num_cpus=1)(RolloutActor).remote(make_cfg(qwen2_assets, start.checkpoint / "policy"), 0)
    batch = ray_local.get(handle.generate.remote(prompts(qwen2_assets, 16)))
    yield SimpleNamespace(handle=handle, batch=batch, probes=ray_local.get(handle.probes.remote()))
    ray_local.kill(handle)


@pytest.fixture(scope="module")
def trained(start, actor):
    """One update on the engine's batch, scored here (the score is beside the point): the
    learner's version 1, published and checkpointed."""
    for r in actor.batch.rollouts:
        r.score = sum(t % 2 for t in r.response_token_ids) / len(r.response_token_ids)
    result = start.learner.update(actor.batch.rollouts)
    return SimpleNamespace(
        result=result, handle=start.learner.publish(), checkpoint=Path(start.learner.save_checkpoint({}))
    )


# --------------------------------------------------------------------------- assets


def test_qwen2_assets_carry_the_family_traits_and_build_deterministically(qwen2_assets, tmp_path):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.demo.assets import build_assets
    from reward_service.model import RewardModel

    # Its own tokenizer class, from tokenizer.json or from vocab.json + merges.txt alone.
    tok = AutoTokenizer.from_pretrained(qwen2_assets.policy)
    assert isinstance(tok, transformers.Qwen2TokenizerFast) and tok.is_fast
    written = json.loads((qwen2_assets.policy / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "Qwen2Tokenizer"
    assert tok.pad_token_id != tok.eos_token_id
    ids = prompt_token_ids(tok, (("user", "Where does Anna live?"),))
    assert tok.decode(ids) == "<|user|>Where does Anna live?<|eos|><|assistant|>"
    assert response_token_ids(tok, "Oslo.")[-1] == tok.eos_token_id
    text = "Zebra ünïcode ✓ 123, isn't it?"
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(encoded) == text
    assert len(tok("2024", add_special_tokens=False)["input_ids"]) == 4  # Qwen's regex: one digit a piece
    vocab_files = tmp_path / "vocab-files"
    shutil.copytree(qwen2_assets.policy, vocab_files, ignore=shutil.ignore_patterns("tokenizer.json", "*.safetensors"))
    from_vocab = AutoTokenizer.from_pretrained(vocab_files)
    assert isinstance(from_vocab, transformers.Qwen2TokenizerFast)
    assert from_vocab(text, add_special_tokens=False)["input_ids"] == encoded
    assert prompt_token_ids(from_vocab, (("user", "Where does Anna live?"),)) == ids

    # Biases on q/k/v only, grouped-query attention at head_dim 64, an untied LM head.
    policy = AutoModelForCausalLM.from_pretrained(qwen2_assets.policy)
    cfg = policy.config
    assert type(policy).__name__ == "Qwen2ForCausalLM" and cfg.tie_word_embeddings is False
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.hidden_size // cfg.num_attention_heads == 64
    assert 2e5 < sum(p.numel() for p in policy.parameters()) < 6e5
    attention = policy.model.layers[0].self_attn
    assert attention.k_proj.weight.shape[0] == attention.q_proj.weight.shape[0] // 2
    # Drawn, not transformers' zeros: a load that dropped them would show.
    assert all(float(getattr(attention, m).bias.detach().abs().mean()) > 1e-3 for m in BIASED)
    assert attention.o_proj.bias is None
    assert policy.lm_head.weight.data_ptr() != policy.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(policy.lm_head.weight, policy.model.embed_tokens.weight)

    # The reward model, as the reward service scores with it: one score, read at the last
    # token that is not padding, so a batch scores each item as it scores alone.
    scorer = RewardModel.load(qwen2_assets.reward)
    assert type(scorer.model).__name__ == "Qwen2ForSequenceClassification"
    assert scorer.model.config.num_labels == 1 and scorer.model.config.pad_token_id == tok.pad_token_id
    questions, answers = ["Where does Anna live?", "hi"], ["In Oslo, by the sea.", "no"]
    batched = scorer.score(questions, answers)
    alone = [scorer.score([q], [a])[0] for q, a in zip(questions, answers)]
    assert batched == pytest.approx(alone, abs=1e-5) and batched[0] != pytest.approx(batched[1], abs=1e-4)

    again = build_assets(tmp_path / "again", "tiny", seed=0, log=lambda *_: None, family="qwen2")
    assert digest(again.root) == digest(qwen2_assets.root)
    with pytest.raises(ValueError, match="choose one of llama, qwen2"):
        build_assets(tmp_path / "other", "tiny", family="gemma")


# --------------------------------------------------------------------------- the engine


def test_the_engine_built_from_the_learners_checkpoint_samples_the_policys_log_probs(actor, start, qwen2_assets):
    """Version 0 as vLLM loaded it from the learner's export: the weights it computes with
    are the assets' (q/k/v biases bit for bit), and its log-probs transformers'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen2_assets.policy)
    batch = actor.batch
    assert batch.policy_version == 0 and len(batch.rollouts) == 16
    for r in batch.rollouts:
        assert 1 <= len(r.response_token_ids) == len(r.behaviour_logprobs) <= 12
        assert (r.response_token_ids[-1] == tok.eos_token_id) == (r.finish_reason == "stop")
        assert r.response_text == tok.decode(r.response_token_ids, skip_special_tokens=True)

    on_disk = safetensors_of(qwen2_assets.policy)
    assert all(torch.equal(t, start.policy[name]) for name, t in on_disk.items())
    measured, fused = actor.probes
    assert "model.layers.0.self_attn.qkv_proj.bias" in measured and fused["qkv_proj"] == list(BIASED)
    check = compare_probes(
        measured, probes_of(on_disk.items()), fused, exact={n for n, t in on_disk.items() if t.ndim == 1}
    )
    assert check.ok, check.problem

    policy = AutoModelForCausalLM.from_pretrained(qwen2_assets.policy).eval()
    gaps = [
        float(
            np.abs(
                hf_logprobs(policy, r.prompt_token_ids, r.response_token_ids, 1.0) - np.array(r.behaviour_logprobs)
            ).max()
        )
        for r in batch.rollouts
    ]
    assert max(gaps) < 1e-4


# --------------------------------------------------------------------------- the learner


def test_one_update_trains_every_qwen2_weight_with_a_critic_from_the_reward_model(trained, start, qwen2_assets):
    from transformers import AutoModelForSequenceClassification

    learner, result = start.learner, trained.result
    # The critic started as the reward model, every tensor of it.
    reward = params(AutoModelForSequenceClassification.from_pretrained(qwen2_assets.reward))
    assert type(learner.critic).__name__ == "Qwen2ForSequenceClassification"
    assert start.critic.keys() == reward.keys()
    assert all(torch.equal(start.critic[n], reward[n]) for n in reward)

    assert not result.skipped and result.version == learner.version() == 1
    metrics = result.metrics
    # The engine sampled with the learner's weights: its behaviour log-probs are the learner's.
    assert metrics["rollout/max_abs_logp_delta"] < 1e-4
    assert metrics["val/ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(metrics["loss/value_avg"]) and metrics["loss/value_avg"] > 0
    assert metrics["learner/optimizer_steps"] == 2.0

    # Every tensor moved, the q/k/v biases and the untied head among them, each on its own.
    policy, critic = params(learner.policy), params(learner.critic)
    assert [n for n in policy if torch.equal(policy[n], start.policy[n])] == []
    assert [n for n in critic if torch.equal(critic[n], start.critic[n])] == []
    head_step = policy["lm_head.weight"] - start.policy["lm_head.weight"]
    assert not torch.equal(head_step, policy["model.embed_tokens.weight"] - start.policy["model.embed_tokens.weight"])


def test_the_checkpoint_export_loads_in_transformers_with_the_learners_weights(trained, start):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for version, (folder, want) in enumerate(
        [(start.checkpoint, start.policy), (trained.checkpoint, params(start.learner.policy))]
    ):
        policy = AutoModelForCausalLM.from_pretrained(folder / "policy")
        assert type(policy).__name__ == "Qwen2ForCausalLM" and policy.config.tie_word_embeddings is False
        got = params(policy)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), version
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(got[bias], start.policy[bias])  # version 1 is not version 0

    critic = params(AutoModelForSequenceClassification.from_pretrained(trained.checkpoint / "critic"))
    want = params(start.learner.critic)
    assert critic.keys() == want.keys() and all(torch.equal(critic[n], want[n]) for n in want)

    tok = AutoTokenizer.from_pretrained(trained.checkpoint / "policy")
    assert type(tok).__name__ == type(start.learner.tokenizer).__name__ == "Qwen2Tokenizer"
    text = "<|user|>Where does Quinn live?<|eos|><|assistant|>"
    assert tok(text)["input_ids"] == start.learner.tokenizer(text)["input_ids"]


# --------------------------------------------------------------------------- the weight load


def test_the_published_version_loads_verified_and_the_engine_samples_the_learners_log_probs(
    actor, trained, start, qwen2_assets
):
    """Version 1 into the engine that runs version 0: q/k/v weights and biases are joined into
    vLLM's qkv_proj (q twice as wide as k and v), the head loaded apart from the embedding;
    the probes prove it, by either load path, and so do the log-probs."""
    import ray

    learner, handle = start.learner, trained.handle
    assert handle.version == 1
    published = ObjectStoreTransport.fetch(handle)
    assert published.keys() == dict(learner.policy.named_parameters()).keys()
    assert {f"model.layers.0.self_attn.{m}.bias" for m in BIASED} | {"lm_head.weight"} <= published.keys()

    # The engine still computes version 0: its log-probs are not the learner's.
    stale, _ = max_logprob_gap(actor.batch.rollouts, learner.logprobs(actor.batch.rollouts))
    assert stale > 1e-2

    result = ray.get(actor.handle.load_weights.remote(handle))
    assert result.loaded is True and result.verified is True and result.direct is True, result.problem
    assert result.policy_version == 1
    # What the engine holds is, probe for probe, the version-1 checkpoint on disk.
    measured, fused = ray.get(actor.handle.probes.remote())
    exported = safetensors_of(trained.checkpoint / "policy")
    assert compare_probes(
        measured, probes_of(exported.items()), fused, exact={n for n, t in exported.items() if t.ndim == 1}
    ).ok

    batch = ray.get(actor.handle.generate.remote(prompts(qwen2_assets, 12, start=100)))
    assert batch.policy_version == 1
    gap, tokens = max_logprob_gap(batch.rollouts, learner.logprobs(batch.rollouts))
    assert tokens > 50 and gap < 1e-4

    # vLLM's own reload (the GPU path) maps the same names onto the fused parameters; a load
    # that left version 0 in the engine fails verification, naming the tensor.
    ray.get(actor.handle.__ray_call__.remote(load_with_vllms_reload, safetensors_of(qwen2_assets.policy)))
    held_back = ray.get(actor.handle.load_weights.remote(handle))  # the version it holds: verified only
    assert held_back.loaded is False and held_back.verified is False and "engine tensor" in held_back.problem
    ray.get(actor.handle.__ray_call__.remote(load_with_vllms_reload, dict(published)))
    again = ray.get(actor.handle.load_weights.remote(handle))
    assert again.loaded is False and again.verified is True, again.problem
    batch = ray.get(actor.handle.generate.remote(prompts(qwen2_assets, 12, start=100)))
    gap, _ = max_logprob_gap(batch.rollouts, learner.logprobs(batch.rollouts))
    assert gap < 1e-4
