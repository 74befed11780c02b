"""Demonstration data for SFT and PPO-ptx: `{"prompt", "response"}` records, read from a
JSONL file or a local Hugging Face dataset folder, and turned into token ids the way every
role does it (`cluster.records.prompt_token_ids` / `response_token_ids`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.config import DataError  # the project's data error: the CLI maps it to exit 2
from cluster.records import prompt_token_ids, response_token_ids

__all__ = ["DataError", "Example", "collate_demonstrations", "encode_demonstrations",
           "read_demonstrations"]


@dataclass(frozen=True)
class Example:
    """One tokenised demonstration: prompt ids then response ids (ending with EOS)."""

    input_ids: list[int]
    prompt_length: int
    """Tokens of the prompt; the loss covers only the tokens after them."""


def _check_record(row: Any, where: str) -> dict[str, str]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with \"prompt\" and \"response\", "
                        f"got {type(row).__name__}")
    for key in ("prompt", "response"):
        if key not in row:
            raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(row[key], str) or not row[key].strip():
            raise DataError(f"{where}: {key!r} must be a non-empty string")
    return {"prompt": row["prompt"], "response": row["response"]}


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    rows = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{n}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            rows.append(_check_record(row, f"{path}:{n}"))
    return rows


def _read_saved_dataset(path: Path) -> list[dict[str, str]]:
    """A folder written by `datasets.Dataset.save_to_disk` (needs the `datasets` package)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a saved Hugging Face dataset needs the `datasets` package "
                        "(pip install datasets), or export it to JSONL") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    return [_check_record(row, f"{path}: row {i}") for i, row in enumerate(ds)]


def read_demonstrations(path: str | Path) -> list[dict[str, str]]:
    """`{"prompt", "response"}` records from a JSONL file, or from a folder: either one
    written by `datasets`' `save_to_disk`, or a dataset repository holding JSONL files
    (all `*.jsonl` under it, in path order; those with "train" in their name when any do).

    Raises DataError naming the file and line of the first bad record.
    """
    path = Path(path)
    if path.is_file():
        rows = _read_jsonl(path)
    elif path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            rows = _read_saved_dataset(path)
        else:
            files = sorted(path.rglob("*.jsonl"))
            train = [f for f in files if "train" in f.name]
            files = train or files
            if not files:
                raise DataError(f"{path}: no *.jsonl files in this folder")
            rows = [row for f in files for row in _read_jsonl(f)]
    else:
        raise DataError(f"{path}: data file not found")
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def encode_demonstrations(tokenizer: Any, rows: list[dict[str, str]], max_length: int,
                          chat_template: bool = True) -> list[Example]:
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


def collate_demonstrations(examples: list[Example], pad_token_id: int,
                           device: torch.device | str = "cpu"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch to its longest example.

    Returns input_ids (B, L), attention_mask (B, L) and loss_mask (B, L-1): 1 where
    position t predicts a response token input_ids[:, t+1].
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width - 1))
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        attention_mask[b, :n] = 1
        loss_mask[b, e.prompt_length - 1: n - 1] = 1.0
    return input_ids.to(device), attention_mask.to(device), loss_mask.to(device)
