"""How text becomes tokens: one definition, used by the actors (generation), the learner (SFT)
and the reward model (training and serving), so that every role sees a (prompt, response)
pair as the same ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.shared.errors import ConfigError


def prompt_token_ids(tokenizer: Any, messages: Any, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt as the policy sees it: the chat template with the assistant
    turn opened, or the raw text of the last turn when `chat_template` is false."""
    turns = (
        [{"role": r, "content": c} for r, c in messages]
        if not isinstance(messages, str)
        else [{"role": "user", "content": messages}]
    )
    if chat_template:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(turns[-1]["content"], add_special_tokens=False)["input_ids"]


def has_chat_template(folder: str | Path) -> bool:
    """Whether the tokenizer saved in `folder` has a default chat template, read from the
    files transformers takes it from (no tokenizer is loaded, so a start-up check stays cheap):
    `chat_template.jinja`, `additional_chat_templates/default.jinja`, or the `chat_template`
    of `tokenizer_config.json` (a string, or a list of named templates with a "default")."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file() or (folder / "additional_chat_templates/default.jinja").is_file():
        return True
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    if isinstance(template, list):
        return any(isinstance(t, dict) and t.get("name") == "default" for t in template)
    return bool(template)


def require_chat_template(folder: str | Path, key: str) -> None:
    """A ConfigError naming `key` (the model's config key) when `data.chat_template` is on but
    the tokenizer in `folder` has none: every prompt it formats would raise."""
    if not has_chat_template(folder):
        raise ConfigError(
            f"data.chat_template is true, but the tokenizer of {key} ({folder}) has no chat "
            "template: set data.chat_template false, or give the tokenizer one (chat_template.jinja "
            "in its folder)"
        )


def response_token_ids(tokenizer: Any, response: str, add_eos: bool = True) -> list[int]:
    """Token ids of a response as the policy would generate it, ending with EOS."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def pad_token_id(tokenizer: Any) -> int:
    """The id that fills a batch's padding: the tokenizer's PAD, else its EOS (many causal LMs
    ship without a PAD). Padding is masked out of attention and of every loss, so any real id
    does; the reward model alone needs a PAD distinct from EOS, and checks it where it loads."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[Any, Any]:
    """Token id lists padded into a batch: `input_ids` (B, T) and `attention_mask` (B, T),
    T the longest length. Right padding keeps row b's tokens at [0, len_b), so causal
    attention never sees padding; left padding lines the last tokens up (for generation)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad needs a non-empty list of non-empty sequences")
    ids = [torch.tensor(s, dtype=torch.long) for s in sequences]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_id, padding_side=side)
    mask = pad_sequence([torch.ones_like(s) for s in ids], batch_first=True, padding_value=0, padding_side=side)
    return input_ids, mask
