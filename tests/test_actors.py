"""The rollout actor against a real vLLM engine in a real Ray actor, checked with transformers.

Two actors are built once for the module (engines cost seconds on CPU): one samples at
temperature 1, scores through a scorer and computes the reference log-probs meanwhile
(`rollout.reference_logprobs`), the other samples at temperature 0.7 with
samples_per_prompt=4, a short max_new_tokens and a stop string, so both finish reasons occur.
"""

from __future__ import annotations

import math
import re
import sys
import warnings

import numpy as np
import pytest
import torch

from cluster.shared.config import TameConfig
from cluster.shared.records import Prompt
from cluster.shared.tokens import prompt_token_ids
from cluster.shared.transport import (
    ObjectStoreTransport,
    WeightsHandle,
    compare_probes,
    export_tensors,
    import_tensors,
    probes_of,
)
from tests.support import hf_logprobs

PROMPTS = [
    Prompt("0:0", (("user", "What colour is the sky?"),)),
    Prompt("0:1", (("user", "Tell me about the fox."),)),
    Prompt("0:2", (("user", "Hello"), ("assistant", "Hi!"), ("user", "Please answer in one word."))),
]


def length_scorer(prompts: list[str], responses: list[str]) -> list[float]:
    """Score = characters of the response; raises for a prompt asking it to, NaN on request."""
    if any("RAISE" in p for p in prompts):
        raise ConnectionError("reward service unreachable")
    return [math.nan if "NAN" in p else float(len(r)) for p, r in zip(prompts, responses)]


def make_config(policy: str, reference_logprobs: bool = False, **sampling) -> TameConfig:
    return TameConfig.model_validate(
        {
            "model": {"policy": policy},  # the actors never read model.reward
            "rollout": {
                "num_cpus": 1,
                "max_model_len": 256,
                "kv_cache_gib": 0.25,
                "reference_logprobs": reference_logprobs,
                "sampling": {"max_new_tokens": 24, **sampling},
            },
        }
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets.policy)


@pytest.fixture(scope="module")
def hf_policy(tiny_assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_assets.policy, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def actors(tiny_assets, ray_local):
    """(actor at T=1 with a scorer and the reference, actor at T=0.7 with 4 samples, 6 new
    tokens, stop "h")."""
    from ray import cloudpickle

    from actors.rollout import RolloutActor

    # The scorer travels to the actor by value: the worker cannot import this test module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    remote = ray_local.remote(num_cpus=1)(RolloutActor)
    scored = remote.remote(make_config(str(tiny_assets.policy), reference_logprobs=True), 0, length_scorer)
    warm = remote.remote(
        make_config(str(tiny_assets.policy), temperature=0.7, samples_per_prompt=4, max_new_tokens=6, stop=["h"]), 1
    )
    # What each engine held when it came up, measured before any test loads other weights.
    infos = [
        {**info, "probes": ray_local.get(actor.probes.remote())}
        for actor, info in zip((scored, warm), ray_local.get([scored.ready.remote(), warm.ready.remote()]))
    ]
    yield scored, warm, infos
    for actor in (scored, warm):
        ray_local.kill(actor)


def max_logprob_error(model, batch, temperature: float) -> float:
    return max(
        float(
            np.abs(
                hf_logprobs(model, r.prompt_token_ids, r.response_token_ids, temperature)
                - np.array(r.behaviour_logprobs)
            ).max()
        )
        for r in batch.rollouts
    )


def max_reference_error(model, batch, temperature: float) -> float:
    assert batch.rollouts and all(len(r.reference_logprobs) == len(r.response_token_ids) for r in batch.rollouts)
    return max(
        float(
            np.abs(
                hf_logprobs(model, r.prompt_token_ids, r.response_token_ids, temperature)
                - np.array(r.reference_logprobs)
            ).max()
        )
        for r in batch.rollouts
    )


def perturbed_handle(hf_policy, version: int, seed: int, dtype=None) -> tuple[WeightsHandle, dict]:
    """A published version: the policy's weights plus noise, in the object store."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in hf_policy.state_dict().items()}
    return ObjectStoreTransport().publish(state.items(), version, dtype), state


def holding_disk_weights(actor, hf_policy) -> int:
    """Make the engine hold the policy's weights on disk again (a test before may have loaded
    others); returns the version it holds them as."""
    import ray

    version = ray.get(actor.policy_version.remote())
    if engine_holds(actor, hf_policy.state_dict()):
        return version
    handle = ObjectStoreTransport().publish(hf_policy.state_dict().items(), version + 1)
    assert ray.get(actor.load_weights.remote(handle)).verified
    return version + 1


def engine_holds(actor, state: dict) -> bool:
    """Whether the engine's own probes match the weights of `state`."""
    import ray

    measured, fused = ray.get(actor.probes.remote())
    return compare_probes(measured, probes_of(state.items()), fused).ok


def load_with_vllms_reload(actor, tensors: dict) -> None:
    """Inside a rollout actor (`__ray_call__`): load through vLLM's reload, the path for GPUs and
    for models the direct load does not cover."""
    from actors.weights import load_into_engine

    assert load_into_engine(actor._llm, tensors, direct=False) == "vllm"


def test_ready_reports_version_zero_and_the_engine_holds_the_disk_weights(actors, tiny_assets):
    from safetensors.torch import load_file

    _, _, infos = actors
    on_disk = load_file(tiny_assets.policy / "model.safetensors")
    assert [info["actor_id"] for info in infos] == [0, 1]
    assert [info["policy_version"] for info in infos] == [0, 0]
    assert infos[0]["pid"] != infos[1]["pid"]
    # Measured from the engine (vLLM fuses q/k/v and gate/up, packs linears for oneDNN).
    for info in infos:
        measured, fused = info["probes"]
        assert compare_probes(measured, probes_of(on_disk.items()), fused).ok


def test_generate_returns_well_formed_scored_records(actors, tokenizer, hf_policy):
    import ray

    scored, _, _ = actors
    version = holding_disk_weights(scored, hf_policy)
    batch = ray.get(scored.generate.remote(PROMPTS))

    assert batch.actor_id == 0 and batch.policy_version == version
    assert batch.prompt_ids == [p.prompt_id for p in PROMPTS]
    assert batch.failed_prompt_ids == []
    assert [(r.prompt_id, r.sample_index) for r in batch.rollouts] == [(p.prompt_id, 0) for p in PROMPTS]
    assert batch.generated_tokens == sum(len(r.response_token_ids) for r in batch.rollouts)
    assert batch.generate_seconds > 0 and batch.score_seconds > 0
    for prompt, r in zip(PROMPTS, batch.rollouts):
        # The chat template was applied, ending with the opened assistant turn.
        assert r.prompt_token_ids == prompt_token_ids(tokenizer, prompt.messages, True)
        assert tokenizer.decode(r.prompt_token_ids).endswith("<|assistant|>")
        assert r.prompt_text == prompt.messages[-1][1]
        assert 1 <= len(r.response_token_ids) == len(r.behaviour_logprobs) <= 24
        assert all(math.isfinite(x) and x <= 0 for x in r.behaviour_logprobs)
        assert r.response_text == tokenizer.decode(r.response_token_ids, skip_special_tokens=True)
        if r.finish_reason == "stop":
            assert r.response_token_ids[-1] == tokenizer.eos_token_id
        else:
            assert r.finish_reason == "length" and len(r.response_token_ids) == 24
            assert tokenizer.eos_token_id not in r.response_token_ids
        assert r.policy_version == version and r.actor_id == 0
        assert r.score == float(len(r.response_text)) and r.score_seconds == batch.score_seconds
    assert max_logprob_error(hf_policy, batch, temperature=1.0) < 1e-4
    # The engine holds the SFT weights: reference and behaviour log-probs are the same numbers.
    assert batch.reference_seconds > 0
    assert max_reference_error(hf_policy, batch, temperature=1.0) < 1e-5


def test_behaviour_logprobs_are_at_the_sampling_temperature(actors, hf_policy, tokenizer):
    import ray

    _, warm, _ = actors
    holding_disk_weights(warm, hf_policy)
    batch = ray.get(warm.generate.remote(PROMPTS))

    # Four samples of each prompt; each ends at the stop string "h" or after 6 tokens.
    assert [(r.prompt_id, r.sample_index) for r in batch.rollouts] == [
        (p.prompt_id, i) for p in PROMPTS for i in range(4)
    ]
    assert all(r.score is None and r.reference_logprobs is None for r in batch.rollouts)
    for r in batch.rollouts:
        full_text = tokenizer.decode(r.response_token_ids, skip_special_tokens=True)
        if r.finish_reason == "stop":
            # The text stops before the stop string; the tokens include the one that made it.
            assert "h" not in r.response_text and "h" in full_text
        else:
            assert r.finish_reason == "length" and len(r.response_token_ids) == 6
            assert "h" not in full_text
    assert {r.finish_reason for r in batch.rollouts} == {"stop", "length"}
    assert max_logprob_error(hf_policy, batch, temperature=0.7) < 1e-4
    # Raw (temperature 1) log-probs would be far off: the check can tell them apart.
    assert max_logprob_error(hf_policy, batch, temperature=1.0) > 1e-2


def test_scorer_failures_hand_prompts_back(actors):
    import ray

    scored, _, _ = actors
    nan_prompt = Prompt("0:3", (("user", "NAN please"),))
    batch = ray.get(scored.generate.remote([PROMPTS[0], nan_prompt]))
    assert batch.prompt_ids == ["0:0", "0:3"]
    assert batch.failed_prompt_ids == ["0:3"]
    assert [r.prompt_id for r in batch.rollouts] == ["0:0"]

    raising = Prompt("0:4", (("user", "RAISE please"),))
    batch = ray.get(scored.generate.remote([PROMPTS[1], raising]))
    assert batch.failed_prompt_ids == ["0:1", "0:4"]
    assert batch.rollouts == []


def test_weight_load_changes_logprobs_and_version(actors, hf_policy):
    import ray

    scored, _, _ = actors
    version = ray.get(scored.policy_version.remote()) + 1  # whatever other tests loaded before
    handle, state = perturbed_handle(hf_policy, version=version, seed=1)
    result = ray.get(scored.load_weights.remote(handle))

    assert result.policy_version == version and result.loaded is True and result.verified is True
    assert result.bytes == handle.nbytes and result.seconds > result.verify_seconds > 0
    assert engine_holds(scored, state) and not engine_holds(scored, hf_policy.state_dict())
    assert ray.get(scored.policy_version.remote()) == version

    batch = ray.get(scored.generate.remote(PROMPTS))
    assert batch.policy_version == version and all(r.policy_version == version for r in batch.rollouts)
    new_policy = _model_with(hf_policy, state)
    assert max_logprob_error(new_policy, batch, temperature=1.0) < 1e-4
    assert max_logprob_error(hf_policy, batch, temperature=1.0) > 1e-2
    # The reference stays the SFT model whatever the engine was sent.
    assert max_reference_error(hf_policy, batch, temperature=1.0) < 1e-5

    # The version held again: verified, not loaded. An older one changes nothing.
    again = ray.get(scored.load_weights.remote(handle))
    assert again.loaded is False and again.verified is True and again.bytes == 0
    older, _ = perturbed_handle(hf_policy, version=version - 1, seed=2)
    again = ray.get(scored.load_weights.remote(older))
    assert again.loaded is False and again.verified is None and again.policy_version == version
    assert engine_holds(scored, state)


def test_submitted_prompts_come_back_as_they_end_across_a_load_in_flight(actors, hf_policy):
    """Continuous generation: prompts submitted, two engine steps, a new version loaded and
    verified while they run, the rest collected. Every prompt comes back once, scored, with
    its reference log-probs; the responses still running at the load span two versions: the
    tokens of the steps before it carry the old version and its weights' log-probs, the rest
    the new one."""
    import ray

    scored, _, _ = actors
    version = holding_disk_weights(scored, hf_policy)
    early = ray.get(scored.collect.remote(PROMPTS, max_steps=2))
    handle, _ = perturbed_handle(hf_policy, version=version + 1, seed=3)
    load = ray.get(scored.load_weights.remote(handle))
    assert load.loaded and load.verified, load.problem
    batches = [early]
    while sum(len(b.prompt_ids) for b in batches) < len(PROMPTS):
        batches.append(ray.get(scored.collect.remote()))
        assert batches[-1].prompt_ids, "collect returned nothing with prompts in flight"

    rollouts = [r for b in batches for r in b.rollouts]
    assert sorted(p for b in batches for p in b.prompt_ids) == sorted(p.prompt_id for p in PROMPTS)
    assert all(r.score == len(r.response_text) and r.policy_version == version for r in rollouts)
    assert max_reference_error(hf_policy, batches[-1], temperature=1.0) < 1e-5
    spanning = [r for r in rollouts if r.token_versions[-1] == version + 1]
    assert spanning, "no response outlived the load"
    # The load came after the early collect's steps: 2, or 1 if a prompt ended in the first.
    assert len({r.token_versions.count(version) for r in spanning}) == 1
    assert spanning[0].token_versions.count(version) in (1, 2)
    for r in rollouts:
        assert len(r.token_versions) == len(r.response_token_ids) == len(r.behaviour_logprobs)
        before = r.token_versions.count(version)
        assert r.token_versions == [version] * before + [version + 1] * (len(r.token_versions) - before)
        old = hf_logprobs(hf_policy, r.prompt_token_ids, r.response_token_ids, 1.0)
        assert np.abs(old[:before] - np.array(r.behaviour_logprobs[:before])).max() < 1e-4


def test_a_policy_that_ends_at_once_finishes_with_stop(actors, hf_policy, tokenizer):
    """Weights rigged so EOS takes nearly all probability: every response is [EOS], 'stop'."""
    import ray

    scored, _, _ = actors
    eos, j = tokenizer.eos_token_id, 0
    state = {k: v.clone() for k, v in hf_policy.state_dict().items()}
    # A constant coordinate j dominates the residual stream, the final norm keeps only j,
    # and only EOS reads it: logit(EOS) is about 8 * 3 = 24, every other logit under 1.
    state["model.embed_tokens.weight"][:, j] += 10.0
    state["model.norm.weight"].zero_()
    state["model.norm.weight"][j] = 1.0
    state["lm_head.weight"][eos, j] = 3.0
    version = ray.get(scored.policy_version.remote()) + 1
    handle = ObjectStoreTransport().publish(state.items(), version)
    assert ray.get(scored.load_weights.remote(handle)).verified is True

    batch = ray.get(scored.generate.remote(PROMPTS))
    assert [r.response_token_ids for r in batch.rollouts] == [[eos]] * len(PROMPTS)
    assert all(r.finish_reason == "stop" and r.response_text == "" for r in batch.rollouts)
    assert all(r.score == 0.0 and r.policy_version == version for r in batch.rollouts)
    assert max_logprob_error(_model_with(hf_policy, state), batch, temperature=1.0) < 1e-4


def test_weight_load_in_bfloat16_transport(actors, hf_policy):
    """A handle in a narrower dtype than the engine is cast on load; the probes still agree."""
    import ray

    _, warm, _ = actors
    version = ray.get(warm.policy_version.remote()) + 1
    handle, state = perturbed_handle(hf_policy, version=version, seed=3, dtype=torch.bfloat16)
    assert {s.dtype for s in handle.specs} == {"bfloat16"}
    result = ray.get(warm.load_weights.remote(handle))
    assert result.policy_version == version and result.verified is True
    assert engine_holds(warm, {k: v.bfloat16() for k, v in state.items()})
    assert not engine_holds(warm, state)  # the float32 values were rounded on the way


@pytest.mark.parametrize(
    "break_it, message",
    [
        ("shape", "'model.layers.1.mlp.down_proj.weight' has shape (64, 127)"),
        ("name", "'model.layers.1.mlp.down_proj.weights' is not a weight"),
        ("missing", "'model.layers.1.mlp.down_proj.weight' of the engine's model is missing"),
    ],
)
def test_broken_handle_is_refused_and_the_actor_keeps_serving(actors, hf_policy, break_it, message):
    import ray

    from actors.weights import WeightsMismatchError

    scored, _, _ = actors
    before = ray.get(scored.ready.remote())
    held = ray.get(scored.probes.remote())
    state = dict(hf_policy.state_dict())
    bad = "model.layers.1.mlp.down_proj.weight"
    if break_it == "shape":
        state[bad] = state[bad][:, :127]
    elif break_it == "name":
        state[bad + "s"] = state.pop(bad)
    else:
        del state[bad]
    handle = ObjectStoreTransport().publish(state.items(), before["policy_version"] + 10)

    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(scored.load_weights.remote(handle))
    assert isinstance(err.value.as_instanceof_cause(), WeightsMismatchError)
    assert message in str(err.value)

    after = ray.get(scored.ready.remote())
    assert after == before
    assert ray.get(scored.probes.remote())[0].keys() == held[0].keys()
    assert all(np.array_equal(a, held[0][k]) for k, a in ray.get(scored.probes.remote())[0].items())
    batch = ray.get(scored.generate.remote(PROMPTS[:1]))
    assert batch.policy_version == before["policy_version"] and len(batch.rollouts) == 1


def test_plain_text_prompts_skip_the_chat_template(tokenizer):
    from actors.engine import encode_prompts

    prompt = Prompt("0:9", (("user", "The quick brown fox"),))
    (ids,) = encode_prompts(tokenizer, [prompt], chat_template=False, max_model_len=64)
    assert ids == tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=f"prompt '0:9' has {len(ids)} tokens"):
        encode_prompts(tokenizer, [prompt], chat_template=False, max_model_len=len(ids))


def _model_with(model, state: dict):
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone.eval()


def test_exported_tensors_round_trip_as_views():
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.5, -2.0]).bfloat16()}
    arrays, specs = export_tensors(state.items())
    assert np.shares_memory(arrays[0], state["a"].numpy())  # float32 on CPU: no copy before ray.put
    assert [(s.name, s.shape, s.dtype) for s in specs] == [("a", (2, 3), "float32"), ("b", (2,), "bfloat16")]
    for a in arrays:
        a.flags.writeable = False  # as ray.get returns them: viewed without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        views = import_tensors(arrays, specs)
    assert torch.equal(views["a"], state["a"]) and torch.equal(views["b"], state["b"])

    staging = {}
    arrays, specs = export_tensors(state.items(), torch.bfloat16, staging)
    assert {s.dtype for s in specs} == {"bfloat16"} and staging["a"].dtype == torch.bfloat16
    again, _ = export_tensors(state.items(), torch.bfloat16, staging)
    assert np.shares_memory(again[0], arrays[0])  # the cast goes into the same staging buffer
    assert torch.equal(import_tensors(again, specs)["a"], state["a"].bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parts_back_to_back_in_memory_join_as_a_view_and_no_others(dtype):
    """A direct load hands q/k/v (gate/up) to the repack as one view of the object store where
    they lie back to back; anything else gets the joining copy."""
    from actors.weights import _rows_in_place

    buf = torch.randn(64 * 8).to(dtype)
    q, k, v = buf[:256].view(32, 8), buf[256:320].view(8, 8), buf[320:384].view(8, 8)
    joined = _rows_in_place([q, k, v])
    assert joined.data_ptr() == q.data_ptr() and joined.dtype == dtype
    assert torch.equal(joined, torch.cat([q, k, v]))
    assert _rows_in_place([q]) is q
    assert _rows_in_place([q, v]) is None  # a gap: k lies between
    assert _rows_in_place([k, q]) is None  # out of order
    assert _rows_in_place([q, buf[256:320].view(16, 4)]) is None  # another row width
    assert _rows_in_place([q, buf[256:320].view(8, 8).to(torch.float16)]) is None  # another dtype
    assert _rows_in_place([q, buf[256:384].view(8, 16)[:, :8]]) is None  # not contiguous


@pytest.mark.parametrize("corruption", ["row", "scale", "step"])
def test_a_corrupted_tensor_of_any_layer_fails_verification(actors, hf_policy, corruption):
    """The engine is handed weights in which one tensor differs from the published ones (one
    row zeroed, the whole tensor scaled by 1.001, or one optimizer step at lr 1e-6 missing:
    every element off by 1e-6): the probes catch it for every tensor of the model, naming the
    engine tensor that holds it; the clean weights verify."""
    import ray

    _, warm, _ = actors
    clean = {k: v.clone() for k, v in hf_policy.state_dict().items()}
    probes = ray.put(probes_of(clean.items()))
    version = ray.get(warm.policy_version.remote())
    for name in clean:
        bad = dict(clean)
        if corruption == "row":  # row 1: row 0 of the embedding is the padding token's, zero already
            assert clean[name][1].abs().sum() > 0, name
            bad[name] = clean[name].clone()
            bad[name][1] = 0.0
        elif corruption == "scale":
            bad[name] = clean[name] * 1.001
        else:  # what AdamW's first step does to every element: lr x sign(gradient)
            signs = torch.randint(0, 2, clean[name].shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
            bad[name] = clean[name] + 1e-6 * signs
        arrays, specs = export_tensors(bad.items())
        version += 1
        handle = WeightsHandle(version, (ray.put(tuple(arrays)),), specs, probes, 0)
        result = ray.get(warm.load_weights.remote(handle))
        assert result.loaded is True and result.verified is False, name
        # vLLM fuses q/k/v and gate/up: the problem names the fused tensor.
        fused = re.sub(r"\.(gate|up)_proj\.", ".gate_up_proj.", re.sub(r"\.[qkv]_proj\.", ".qkv_proj.", name))
        assert f"engine tensor {fused!r}" in result.problem, (name, result.problem)
    arrays, specs = export_tensors(clean.items())
    result = ray.get(warm.load_weights.remote(WeightsHandle(version + 1, (ray.put(tuple(arrays)),), specs, probes, 0)))
    assert result.verified is True and result.probe_rms_error < 1e-6


@pytest.mark.parametrize("module", ["lm_head", "model.embed_tokens"])
def test_a_kernel_beside_a_readable_weight_that_kept_other_weights_fails_verification(actors, hf_policy, module):
    """vLLM on CPU computes the logits with the LM head's kernel (some models, Gemma 2 among
    them, with the embedding's), which keeps its own copy of the weight beside the readable
    parameter. A kernel computing with other weights than the parameter holds is caught,
    named as the kernel; a load rebuilds it."""
    import ray

    from cluster.shared.transport import kernel_probe_name

    _, warm, _ = actors
    clean = {k: v.clone() for k, v in hf_policy.state_dict().items()}
    probes = ray.put(probes_of(clean.items()))
    version = ray.get(warm.policy_version.remote()) + 1
    arrays, specs = export_tensors(clean.items())
    handle = WeightsHandle(version, (ray.put(tuple(arrays)),), specs, probes, 0)
    assert ray.get(warm.load_weights.remote(handle)).verified is True
    measured, _ = ray.get(warm.probes.remote())
    kernel = kernel_probe_name(f"{module}.weight", module)
    assert kernel in measured  # probed through the kernel too

    def skew_the_kernel(actor):
        def skew(worker):
            layer = worker.get_model().get_submodule(module)
            computes = layer.cpu_linear
            layer.cpu_linear = lambda x, weight, bias: computes(x, weight, bias) * 1.001

        actor._llm.collective_rpc(skew)

    ray.get(warm.__ray_call__.remote(skew_the_kernel))
    again = WeightsHandle(version + 1, handle.tensors, specs, probes, 0)
    try:
        result = ray.get(warm.load_weights.remote(handle))  # the version it holds: verified again
        assert result.loaded is False and result.verified is False
        assert f"engine tensor {kernel!r} differs" in result.problem, result.problem
    finally:  # the module's engine is shared: a load rebuilds the kernel
        result = ray.get(warm.load_weights.remote(again))
        assert result.verified is True and result.direct is True


def test_a_policy_whose_lm_head_is_its_embedding_loads_and_verifies(tiny_assets, hf_policy, ray_local, tmp_path):
    """Tied word embeddings, as in many small Hugging Face models: the checkpoint and the
    learner name the one tensor once, as the embedding's; the engine's LM head and its logits
    kernel are that tensor, and a published version loads and verifies."""
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.rollout import RolloutActor
    from cluster.shared.transport import kernel_probe_name

    config = type(hf_policy.config).from_dict({**hf_policy.config.to_dict(), "tie_word_embeddings": True})
    tied = AutoModelForCausalLM.from_config(config)
    tied.load_state_dict({k: v for k, v in hf_policy.state_dict().items() if k != "lm_head.weight"}, strict=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    tied.save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(tiny_assets.policy).save_pretrained(tmp_path / "tied")

    actor = ray_local.remote(num_cpus=1)(RolloutActor).remote(make_config(str(tmp_path / "tied")), 2)
    try:
        ray.get(actor.ready.remote())
        published = dict(tied.named_parameters())  # as Learner.publish sends them: the tensor once
        assert "lm_head.weight" not in published
        measured, _ = ray.get(actor.probes.remote())
        assert "lm_head.weight" not in measured  # the head's kernel is probed as computing the embedding's weight
        kernels = {kernel_probe_name("model.embed_tokens.weight", m) for m in ("lm_head", "model.embed_tokens")}
        assert kernels <= set(measured)
        gen = torch.Generator().manual_seed(5)
        state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in published.items()}
        result = ray.get(actor.load_weights.remote(ObjectStoreTransport().publish(state.items(), 1)))
        assert result.loaded is True and result.verified is True and result.direct is True, result.problem
        # vLLM's reload gives the tied head no tensor of its own: its kernel is rebuilt after.
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the helper travels by value
        state = {k: v + 0.01 for k, v in state.items()}
        ray.get(actor.__ray_call__.remote(load_with_vllms_reload, state))
        assert engine_holds(actor, state)
    finally:
        ray.kill(actor)


def test_loads_rebuild_the_kernels_directly_where_the_engine_holds_the_checkpoint_as_named(
    actors, hf_policy, tiny_assets, tmp_path
):
    """On CPU a load rebuilds each linear layer's kernel straight from the published tensors
    (`actors.weights._direct_plan` covers every tensor of the Llama policy) and keeps no view
    of them. An actor takes that path only if its engine holds its checkpoint exactly where
    the plan puts each tensor: against a checkpoint that differs from what the engine holds
    (as when a model's loader changes a tensor on the way in) it keeps vLLM's reload. Loads
    through either path, one after the other on one engine, each verify."""
    import ray
    from safetensors.torch import load_file, save_file

    _, warm, _ = actors

    def inside(actor, checkpoint, path):
        from actors.weights import _direct_plan, _embedding_kernels, loads_directly

        def look(worker):
            steps = _direct_plan(worker.get_model(), checkpoint)
            emptied = all(step.module.weight.numel() == 0 for step in steps if step.kernel)
            return len(steps), len(_embedding_kernels(worker.get_model())), emptied

        (plan,) = actor._llm.collective_rpc(look)
        return (*plan, loads_directly(actor._llm, path))

    on_disk = load_file(tiny_assets.policy / "model.safetensors")
    # What BLOOM's or Falcon's loader does to q/k/v, or PLaMo's to its norms: changed on the way in.
    save_file({**on_disk, "model.norm.weight": on_disk["model.norm.weight"] + 1.0}, tmp_path / "model.safetensors")
    engine_params = len(on_disk) - 3 * hf_policy.config.num_hidden_layers  # q/k/v and gate/up are fused
    holds = holding_disk_weights(warm, hf_policy)
    assert ray.get(warm.__ray_call__.remote(inside, on_disk, tiny_assets.policy)) == (engine_params, 2, True, True)
    assert ray.get(warm.__ray_call__.remote(inside, on_disk, tmp_path))[3] is False

    for seed, path in enumerate(["direct", "vllm", "direct"]):
        handle, state = perturbed_handle(hf_policy, holds + 1 + seed, seed=20 + seed)
        if path == "direct":
            result = ray.get(warm.load_weights.remote(handle))
            assert result.loaded is True and result.verified is True and result.direct is True, result.problem
        else:
            ray.get(warm.__ray_call__.remote(load_with_vllms_reload, dict(state)))
        assert engine_holds(warm, state), path
