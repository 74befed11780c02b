"""`tame assets`: the offline models load through transformers and work; the build is
deterministic from its seed. (That vLLM serves the same policy, log-prob for log-prob, is
tests/test_actors.py's check, on the engines the actors build.)"""

from __future__ import annotations

import hashlib

import torch

from cluster.shared.tokens import prompt_token_ids, response_token_ids


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_is_deterministic(tiny_assets, tmp_path):
    from cluster.demo.assets import build_assets

    again = build_assets(tmp_path / "again", "tiny", seed=0, log=lambda *_: None)
    assert digest(again.root) == digest(tiny_assets.root)
    other = build_assets(tmp_path / "other", "tiny", seed=1, log=lambda *_: None)
    assert digest(other.policy)["model.safetensors"] != digest(tiny_assets.policy)["model.safetensors"]


def test_tokenizer_chat_template_and_special_tokens(tiny_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets.policy)
    assert tok.pad_token_id != tok.eos_token_id
    ids = prompt_token_ids(tok, (("user", "Where does Anna live?"),))
    assert tok.decode(ids) == "<|user|>Where does Anna live?<|eos|><|assistant|>"
    assert response_token_ids(tok, "Oslo.")[-1] == tok.eos_token_id
    # Byte-level BPE: any text round-trips, also outside the training corpus.
    text = "Zebra ünïcode ✓ 123"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_policy_generates_and_reward_model_scores(tiny_assets):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets.policy)
    policy = AutoModelForCausalLM.from_pretrained(tiny_assets.policy)
    assert policy.config.head_dim == 64
    prompt = torch.tensor([prompt_token_ids(tok, (("user", "Say something kind."),))])
    out = policy.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > prompt.shape[1]

    reward = AutoModelForSequenceClassification.from_pretrained(tiny_assets.reward)
    batch = tok(["<|user|>hi<|eos|><|assistant|>hello<|eos|>", "<|user|>hi<|eos|><|assistant|>no<|eos|>"],
                return_tensors="pt", padding=True)
    scores = reward(**batch).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
