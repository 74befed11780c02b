"""`tame assets`: a tokenizer, a policy and a reward model built offline from a seed.

No model hub is reachable from the machines tame is developed on, so the project makes its
own models: a byte-level BPE tokenizer trained on the synthetic world's text, with a chat
template and distinct PAD and EOS tokens; a causal LM (head_dim 64, which vLLM's CPU
attention needs); and a sequence-classification reward model of the same architecture on
the same tokenizer. Everything is saved in Hugging Face format, so `from_pretrained` and
vLLM load it through their real loading code.

Two model families (`FAMILIES`), because users bring checkpoints of several and each has
traits the weight transport and the learner must handle:
- llama: a plain Llama, one key/value head per head, no biases (the default; the demo's);
- qwen2: a Qwen2, with what sets that family apart: biases on q/k/v (which vLLM fuses into
  one qkv_proj), grouped-query attention (fewer key/value heads than heads), an untied LM
  head, and its own tokenizer class (`Qwen2Tokenizer`: Qwen's pre-tokenizing regex, NFC,
  vocab.json + merges.txt beside tokenizer.json).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention when fewer than `heads`); None: one per head."""


SIZES = {
    # Policy 0.19M parameters, reward model 0.14M: unit and integration tests.
    "tiny": Size(vocab=1024, hidden=64, layers=2, heads=1, intermediate=128, max_positions=512),
    # Policy 3.60M parameters, reward model 3.38M: the demo.
    "small": Size(vocab=4096, hidden=256, layers=4, heads=4, intermediate=688, max_positions=512),
    # Policy 86.3M parameters, reward model 85.6M: benchmarks where size matters (weight sync).
    "base": Size(vocab=4096, hidden=768, layers=12, heads=12, intermediate=2048, max_positions=1024),
}
"""The Llama sizes."""

QWEN2_SIZES = {
    # Qwen2's head_dim is hidden / heads (vLLM's Qwen2 reads no head_dim), and grouped-query
    # attention needs two heads at least: hidden 128 keeps head_dim at 64. Tiny: policy 0.42M
    # parameters, reward model 0.31M.
    "tiny": Size(vocab=1024, hidden=128, layers=2, heads=2, kv_heads=1, intermediate=128, max_positions=512),
    "small": Size(vocab=4096, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688, max_positions=512),
    "base": Size(vocab=4096, hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, max_positions=1024),
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


def _train_bpe(vocab_size: int, seed: int, pre_tokenizer: Any, normalizer: Any = None):
    """A byte-level BPE (`tokenizers.Tokenizer`) trained on the world's text, the special
    tokens first (ids 0 to 4)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    if normalizer is not None:
        bpe.normalizer = normalizer
    bpe.pre_tokenizer = pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer)
    return bpe


def build_tokenizer(vocab_size: int, seed: int):
    """The Llama family's tokenizer: a generic `PreTrainedTokenizerFast`."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = _train_bpe(vocab_size, seed, pre_tokenizers.ByteLevel(add_prefix_space=False))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="right",
    )


def build_qwen2_tokenizer(vocab_size: int, seed: int):
    """The Qwen2 family's tokenizer: a `Qwen2Tokenizer` (transformers' fast one; also named
    `Qwen2TokenizerFast`). It rebuilds its pipeline from vocabulary and merges whenever it is
    loaded, so the BPE is trained through that same pipeline (NFC, Qwen's pre-tokenizing
    regex, byte-level), and the tokenizer is made from the trained vocabulary and merges."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = _train_bpe(
        vocab_size,
        seed,
        normalizer=normalizers.NFC(),
        pre_tokenizer=pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
    )
    model = json.loads(bpe.to_str())["model"]
    return Qwen2TokenizerFast(
        vocab=model["vocab"],
        merges=[tuple(merge) for merge in model["merges"]],
        unk_token=None,  # byte-level: every text has tokens (Qwen's default names a token we lack)
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|eos|>", "<|pad|>")],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="right",
    )


def save_tokenizer(tokenizer, folder: Path) -> None:
    """`save_pretrained`, plus the vocabulary files the tokenizer's class names when they are
    vocab.json and merges.txt (Qwen2's): transformers writes only tokenizer.json, and real
    checkpoints of those families carry both."""
    tokenizer.save_pretrained(folder)
    if {"vocab_file", "merges_file"} <= tokenizer.vocab_files_names.keys():
        tokenizer.backend_tokenizer.model.save(str(folder))


def _config_fields(size: Size, tokenizer) -> dict[str, Any]:
    """What every family's config takes from the size and the tokenizer."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads or size.heads,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _llama_config(size: Size, tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        **_config_fields(size, tokenizer),
        head_dim=size.hidden // size.heads,
        rms_norm_eps=1e-5,
        torch_dtype="float32",
        **extra,
    )


def _qwen2_config(size: Size, tokenizer, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(
        **_config_fields(size, tokenizer), rms_norm_eps=1e-6, use_sliding_window=False, dtype="float32", **extra
    )


@dataclass(frozen=True)
class Family:
    """What sets a model family's assets apart; the build is the same for all."""

    sizes: dict[str, Size]
    config: Callable[..., Any]
    """(size, tokenizer, **extra) -> the transformers config of the family's architecture."""
    tokenizer: Callable[[int, int], Any]
    """(vocabulary size, seed) -> the family's trained tokenizer."""


FAMILIES = {
    "llama": Family(SIZES, _llama_config, build_tokenizer),
    "qwen2": Family(QWEN2_SIZES, _qwen2_config, build_qwen2_tokenizer),
}


def _drawn_biases(model):
    """The model with its biases drawn like its weights. Transformers starts them at zero,
    where a load that dropped or misplaced them would change nothing; trained checkpoints
    (Qwen2's q/k/v biases) hold large ones. A model without biases (Llama) draws nothing."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, model.config.initializer_range)
    return model


def build_assets(out: str | Path, size: str = "tiny", seed: int = 0, log=print, family: str = "llama") -> Assets:
    """Build tokenizer, policy, reward model and the demo data of a model family (`FAMILIES`)
    into `out`, deterministically.

    Written into a temporary folder and moved into place, so a crash never leaves
    half-built assets where a later run would pick them up.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    from cluster.demo import world

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: choose one of {', '.join(FAMILIES)}")
    kind = FAMILIES[family]
    if size not in kind.sizes:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(kind.sizes)}")
    spec = kind.sizes[size]
    out = Path(out)
    with atomic_directory(out) as tmp:
        log(f"training a byte-level BPE tokenizer ({spec.vocab} tokens)")
        tokenizer = kind.tokenizer(spec.vocab, seed)

        log(f"building the {size} {family} policy")
        torch.manual_seed(seed)
        policy = _drawn_biases(AutoModelForCausalLM.from_config(kind.config(spec, tokenizer)).float())
        policy.save_pretrained(tmp / "policy")
        GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(
            tmp / "policy"
        )
        save_tokenizer(tokenizer, tmp / "policy")

        log(f"building the {size} {family} reward model")
        torch.manual_seed(seed + 1)
        reward = _drawn_biases(
            AutoModelForSequenceClassification.from_config(kind.config(spec, tokenizer, num_labels=1)).float()
        )
        reward.save_pretrained(tmp / "reward")
        save_tokenizer(tokenizer, tmp / "reward")

        log("writing the demo data")
        world.demo_datasets(tmp / "data", seed)

        n_policy = sum(p.numel() for p in policy.parameters())
        n_reward = sum(p.numel() for p in reward.parameters())
        # A record without a family is Llama's, so Llama assets keep the bytes the demo's
        # figures were measured on.
        named = {} if family == "llama" else {"family": family}
        (tmp / "assets.json").write_text(
            json.dumps(
                {
                    **named,
                    "size": size,
                    "seed": seed,
                    "vocab": len(tokenizer),
                    "policy_parameters": n_policy,
                    "reward_parameters": n_reward,
                },
                indent=2,
            )
            + "\n"
        )
    log(f"assets in {out}: policy {n_policy / 1e6:.2f}M and reward {n_reward / 1e6:.2f}M parameters")
    return Assets(out)


def ensure_assets(out: str | Path, size: str, seed: int = 0, log=print, family: str = "llama") -> Assets:
    """The assets in `out`, built first when they are missing."""
    assets = Assets(Path(out))
    return assets if assets.complete() else build_assets(out, size, seed, log, family)
