"""`tame assets`: the offline models load through transformers and work; the build is
deterministic from its seed; their folders read the same through `cluster.shared.hf_folder`
however they are stored. (That vLLM serves the same policy, log-prob for log-prob, is
tests/test_actors.py's check, on the engines the actors build.)"""

from __future__ import annotations

import hashlib
import json

import torch

from cluster.shared.tokens import prompt_token_ids, response_token_ids


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


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
    batch = tok(
        ["<|user|>hi<|eos|><|assistant|>hello<|eos|>", "<|user|>hi<|eos|><|assistant|>no<|eos|>"],
        return_tensors="pt",
        padding=True,
    )
    scores = reward(**batch).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


def test_a_sharded_checkpoint_reads_as_its_single_file(tiny_assets, tmp_path):
    """Every role reads a model folder through `cluster.shared.hf_folder`: a checkpoint split
    into shards by an index gives the same tensors, shapes and dtypes as one file, and the
    engine's layout is the same."""
    from transformers import AutoModelForSequenceClassification

    from actors.weights import checkpoint_layout
    from cluster.shared.hf_folder import checkpoint_dtype, read_tensor, safetensors_files, tensor_headers

    sharded = tmp_path / "sharded"
    AutoModelForSequenceClassification.from_pretrained(tiny_assets.reward).save_pretrained(
        sharded, max_shard_size="100KB"
    )
    assert (sharded / "model.safetensors.index.json").is_file() and len(safetensors_files(sharded)) > 1
    single = tensor_headers(tiny_assets.reward)
    split = tensor_headers(sharded)
    assert {n: (h.dtype, h.shape) for n, h in split.items()} == {n: (h.dtype, h.shape) for n, h in single.items()}
    assert len({h.file for h in split.values()}) > 1
    assert single["score.weight"].dtype == "F32" and single["score.weight"].shape == (1, 64)
    assert checkpoint_layout(sharded) == checkpoint_layout(tiny_assets.reward)
    for name in ("score.weight", "model.norm.weight"):
        assert torch.equal(read_tensor(sharded, name), read_tensor(tiny_assets.reward, name))
    assert read_tensor(sharded, "score.bias") is None

    # The dtype: config.json's, else the first floating-point tensor's, else float32.
    assert checkpoint_dtype(tiny_assets.policy) == torch.float32
    half = tmp_path / "half"
    AutoModelForSequenceClassification.from_pretrained(tiny_assets.reward).to(torch.bfloat16).save_pretrained(half)
    assert checkpoint_dtype(half) == torch.bfloat16
    config = json.loads((half / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (half / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(half) == torch.bfloat16
    assert tensor_headers(tmp_path / "nothing") == {} and checkpoint_dtype(tmp_path / "nothing") == torch.float32


def test_a_tokenizer_without_pad_pads_with_eos(tiny_assets):
    from transformers import AutoTokenizer

    from cluster.shared.tokens import pad_token_id

    tok = AutoTokenizer.from_pretrained(tiny_assets.policy)
    assert pad_token_id(tok) == tok.pad_token_id != tok.eos_token_id
    tok.pad_token = None
    assert tok.pad_token_id is None and pad_token_id(tok) == tok.eos_token_id
