"""Demonstration data for SFT and PPO-ptx: `{"prompt", "response"}` records, read from a
JSONL file or a local Hugging Face dataset folder, and turned into token ids the way every
role does it (`cluster.shared.tokens.prompt_token_ids` / `response_token_ids`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.shared.data import read_records, string_fields
from cluster.shared.errors import DataError  # the project's data error: the CLI maps it to exit 2
from cluster.shared.tokens import pad, prompt_token_ids, response_token_ids

__all__ = ["DataError", "Example", "collate_demonstrations", "encode_demonstrations", "read_demonstrations"]


@dataclass(frozen=True)
class Example:
    """One tokenised demonstration: prompt ids then response ids (ending with EOS)."""

    input_ids: list[int]
    prompt_length: int
    """Tokens of the prompt; the loss covers only the tokens after them."""


def read_demonstrations(path: str | Path) -> list[dict[str, str]]:
    """`{"prompt", "response"}` records of a JSONL file or dataset folder
    (`cluster.shared.data.read_records`); raises DataError naming the file and line of a bad one."""
    return [
        string_fields(row, where, ("prompt", "response"), non_empty=("prompt", "response"))
        for where, row in read_records(path)
    ]


def encode_demonstrations(
    tokenizer: Any, rows: list[dict[str, str]], max_length: int, chat_template: bool = True
) -> list[Example]:
    """Token ids of each (prompt, response): the prompt through the chat template, the
    response ending with EOS, cut to `max_length` tokens. Examples whose prompt alone fills
    `max_length` have nothing to learn from and are left out."""
    examples = []
    for row in rows:
        prompt = prompt_token_ids(tokenizer, row["prompt"], chat_template)
        ids = (prompt + response_token_ids(tokenizer, row["response"]))[:max_length]
        if len(ids) > len(prompt):
            examples.append(Example(ids, len(prompt)))
    return examples


def collate_demonstrations(
    examples: list[Example], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch to its longest example.

    Returns input_ids (B, L), attention_mask (B, L) and loss_mask (B, L-1): 1 where
    position t predicts a response token input_ids[:, t+1].
    """
    input_ids, attention_mask = pad([e.input_ids for e in examples], pad_token_id)
    loss_mask = torch.zeros((len(examples), input_ids.shape[1] - 1))
    for b, e in enumerate(examples):
        loss_mask[b, e.prompt_length - 1 : len(e.input_ids) - 1] = 1.0
    return input_ids.to(device), attention_mask.to(device), loss_mask.to(device)
