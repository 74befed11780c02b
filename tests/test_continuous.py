"""Continuous generation (`actors.continuous`): an engine stepped by tame, prompts added while
others run, new weights loaded between two steps, every token tagged with its version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.shared.config import TameConfig
from cluster.shared.records import Prompt
from tests.support import hf_logprobs

PROMPTS = [Prompt(f"0:{i}", (("user", text),)) for i, text in enumerate(["Hello", "What is the fox?", "Say one word."])]


@pytest.fixture(scope="module")
def engine(tiny_assets):
    """(llm, cfg, prompt ids, the policy in transformers): 2 samples a prompt at T = 0.8."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.engine import build_engine, encode_prompts

    cfg = TameConfig.model_validate(
        {
            "model": {"policy": str(tiny_assets.policy)},
            "rollout": {
                "max_model_len": 256,
                "kv_cache_gib": 0.25,
                "sampling": {"max_new_tokens": 24, "samples_per_prompt": 2, "temperature": 0.8},
            },
        }
    )
    llm = build_engine(cfg, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.policy)
    ids = encode_prompts(tokenizer, PROMPTS, cfg.data.chat_template, cfg.rollout.max_model_len)
    hf = AutoModelForCausalLM.from_pretrained(tiny_assets.policy, dtype=torch.float32).eval()
    return llm, cfg, ids, hf


def test_a_kept_full_engine_ends_every_prompt_once_with_the_engines_log_probs(engine):
    from actors.continuous import Continuous
    from actors.engine import sampling_params

    llm, cfg, ids, hf = engine
    stepper = Continuous(llm, sampling_params(cfg))
    stepper.add(PROMPTS[0], ids[0], version=0)
    ended = []
    # The other prompts join while the first runs.
    for prompt, prompt_ids in zip(PROMPTS[1:], ids[1:]):
        ended += stepper.step(version=0)
        stepper.add(prompt, prompt_ids, version=0)
    ended += stepper.drain(version=0)

    assert sorted(s.prompt.prompt_id for s in ended) == ["0:0", "0:1", "0:2"]
    assert stepper.sequences == stepper.prompts == 0
    tokens = 0
    for started in ended:
        assert len(started.samples) == 2 and started.version == 0
        for sample in started.samples:
            n = len(sample.token_ids)
            assert 1 <= n <= 24 and len(sample.logprobs) == len(sample.versions) == n
            assert sample.finish_reason in ("stop", "length") and set(sample.versions) == {0}
            expected = hf_logprobs(hf, started.prompt_ids, sample.token_ids, 0.8)
            assert np.abs(expected - np.array(sample.logprobs)).max() < 1e-4
            tokens += n
    assert stepper.occupancy.tokens == tokens and 1 <= stepper.occupancy.mean <= 6


@pytest.mark.parametrize("kv", ["keep", "recompute"])
def test_weights_loaded_between_two_steps_tag_each_token_with_the_version_that_sampled_it(engine, kv):
    """Responses spanning two versions: their first tokens were sampled under version 0 and
    carry it and those weights' log-probs; the rest, under weights loaded in flight, carry
    version 1. With `recompute` those are exactly the new weights' log-probs; with `keep`
    they attend to keys and values the old weights computed, and are neither version's (the
    behaviour log-probs still say what they were drawn from, which is what the importance
    ratio needs)."""
    from actors.continuous import Continuous
    from actors.engine import sampling_params
    from actors.weights import load_into_engine

    llm, cfg, ids, hf = engine
    gen = torch.Generator().manual_seed(0)
    old = {k: v.clone() for k, v in hf.state_dict().items()}
    new = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in old.items()}
    params = sampling_params(cfg)
    params.ignore_eos = True  # every sample outlives the load (min_tokens would mask EOS)
    stepper = Continuous(llm, params)
    for prompt, prompt_ids in zip(PROMPTS, ids):
        stepper.add(prompt, prompt_ids, version=0)
    ended = []
    for _ in range(5):
        ended += stepper.step(version=0)
    load_into_engine(llm, new, direct=False)
    try:
        stepper.weights_changed(kv)
        ended += stepper.drain(version=1)
    finally:
        load_into_engine(llm, old, direct=False)

    assert sorted(s.prompt.prompt_id for s in ended) == ["0:0", "0:1", "0:2"]
    hf_new = type(hf)(hf.config).eval()
    hf_new.load_state_dict(new)
    to_new, to_old = [], []
    for started in ended:
        for sample in started.samples:
            versions = np.array(sample.versions)
            # The prefill and 4 decoding steps sampled 5 tokens under version 0.
            assert (versions[:5] == 0).all() and (versions[5:] == 1).all() and len(versions) >= 12
            logprobs = np.array(sample.logprobs)
            under_old = hf_logprobs(hf, started.prompt_ids, sample.token_ids, 0.8)
            under_new = hf_logprobs(hf_new, started.prompt_ids, sample.token_ids, 0.8)
            assert np.abs(under_old[:5] - logprobs[:5]).max() < 1e-4
            to_new.append(np.abs(under_new[5:] - logprobs[5:]))
            to_old.append(np.abs(under_old[5:] - logprobs[5:]))
    to_new, to_old = np.concatenate(to_new), np.concatenate(to_old)
    if kv == "recompute":
        assert to_new.max() < 1e-4
    else:  # the distribution the tokens were drawn from is neither version's own
        assert to_new.mean() > 1e-2 and to_old.mean() > 1e-2
