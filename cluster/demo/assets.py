"""`tame assets`: a tokenizer, a policy and a reward model built offline from a seed.

No model hub is reachable from the machines tame is developed on, so the project makes its
own models: a byte-level BPE tokenizer trained on the synthetic world's text, with a chat
template and distinct PAD and EOS tokens; a Llama-style causal LM (head_dim 64, which
vLLM's CPU attention needs); and a Llama sequence-classification reward model on the same
tokenizer. Everything is saved in Hugging Face format, so `from_pretrained` and vLLM load it
through their real loading code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cluster.shared.files import atomic_directory

SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Each turn is `<|role|>content<|eos|>`; the generation prompt opens the assistant turn, and
# the policy ends its answer with <|eos|>, which is also the tokenizer's EOS token.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Size:
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int


SIZES = {
    # About 0.3M parameters: unit and integration tests.
    "tiny": Size(vocab=1024, hidden=64, layers=2, heads=1, intermediate=128, max_positions=512),
    # About 5M parameters: the demo.
    "small": Size(vocab=4096, hidden=256, layers=4, heads=4, intermediate=688, max_positions=512),
    # About 90M parameters: benchmarks where size matters (weight sync).
    "base": Size(vocab=4096, hidden=768, layers=12, heads=12, intermediate=2048, max_positions=1024),
}


@dataclass(frozen=True)
class Assets:
    root: Path

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def reward(self) -> Path:
        return self.root / "reward"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def complete(self) -> bool:
        return (self.root / "assets.json").is_file()


def _corpus(seed: int) -> list[str]:
    from cluster.demo import world

    lines = world.World.build(seed).corpus_lines()
    # A little general text so the tokenizer still has merges for words outside the world.
    lines += [
        "The quick brown fox jumps over the lazy dog.",
        "Please answer the question in one word.",
        "Thank you for asking, here is a short and kind answer.",
    ]
    return lines


def build_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="right",
    )


def _llama_config(size: Size, tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        head_dim=size.hidden // size.heads,
        max_position_embeddings=size.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **extra,
    )


def build_assets(out: str | Path, size: str = "tiny", seed: int = 0, log=print) -> Assets:
    """Build tokenizer, policy, reward model and the demo data into `out`, deterministically.

    Written into a temporary folder and moved into place, so a crash never leaves
    half-built assets where a later run would pick them up.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from cluster.demo import world

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    spec = SIZES[size]
    out = Path(out)
    with atomic_directory(out) as tmp:
        log(f"training a byte-level BPE tokenizer ({spec.vocab} tokens)")
        tokenizer = build_tokenizer(spec.vocab, seed)

        log(f"building the {size} policy")
        torch.manual_seed(seed)
        policy = LlamaForCausalLM(_llama_config(spec, tokenizer)).float()
        policy.save_pretrained(tmp / "policy")
        GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        ).save_pretrained(tmp / "policy")
        tokenizer.save_pretrained(tmp / "policy")

        log(f"building the {size} reward model")
        torch.manual_seed(seed + 1)
        reward = LlamaForSequenceClassification(
            _llama_config(spec, tokenizer, num_labels=1)
        ).float()
        reward.save_pretrained(tmp / "reward")
        tokenizer.save_pretrained(tmp / "reward")

        log("writing the demo data")
        world.demo_datasets(tmp / "data", seed)

        n_policy = sum(p.numel() for p in policy.parameters())
        n_reward = sum(p.numel() for p in reward.parameters())
        (tmp / "assets.json").write_text(json.dumps(
            {"size": size, "seed": seed, "vocab": len(tokenizer),
             "policy_parameters": n_policy, "reward_parameters": n_reward}, indent=2) + "\n")
    log(f"assets in {out}: policy {n_policy / 1e6:.2f}M and reward {n_reward / 1e6:.2f}M parameters")
    return Assets(out)


def ensure_assets(out: str | Path, size: str, seed: int = 0, log=print) -> Assets:
    """The assets in `out`, built first when they are missing."""
    assets = Assets(Path(out))
    return assets if assets.complete() else build_assets(out, size, seed, log)
