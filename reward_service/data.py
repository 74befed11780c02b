"""Preference pairs for reward-model training: `{"prompt", "chosen", "rejected"}` records.

Read from a JSONL file (one object a line; blank lines are skipped) or from a local
Hugging Face dataset folder: one written by `datasets.Dataset.save_to_disk` (read with the
`datasets` package, whose "train" split is used for a DatasetDict), or a folder of
`*.jsonl` files. A bad record fails with the file and line (or row) that holds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import DataError  # the project's data error: the CLI maps it to exit 2

__all__ = ["DataError", "FIELDS", "PreferencePair", "load_preference_pairs"]

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    """The response the labeller preferred."""
    rejected: str


def _pair(record: Any, where: str) -> PreferencePair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with {', '.join(FIELDS)}, got {type(record).__name__}")
    for key in FIELDS:
        if key not in record:
            raise DataError(f"{where}: missing field {key!r}")
        if not isinstance(record[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    if not record["prompt"].strip():
        raise DataError(f"{where}: field 'prompt' is empty")
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"])


def _read_jsonl(path: Path) -> list[PreferencePair]:
    pairs = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            pairs.append(_pair(record, where))
    return pairs


def _read_dataset_folder(path: Path) -> list[PreferencePair]:
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: a Hugging Face dataset folder needs the `datasets` package "
                            "(pip install datasets), or give a JSONL file") from None
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{path}: dataset has splits {list(loaded)} but no 'train'")
            loaded = loaded["train"]
        return [_pair(row, f"{path}: row {i}") for i, row in enumerate(loaded)]
    files = sorted(path.glob("*.jsonl"))
    if not files:
        raise DataError(f"{path}: neither a saved Hugging Face dataset nor a folder of *.jsonl files")
    return [pair for file in files for pair in _read_jsonl(file)]


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """Every pair in `path` (JSONL file or dataset folder); raises DataError on a bad record."""
    path = Path(path)
    if path.is_dir():
        pairs = _read_dataset_folder(path)
    elif path.is_file():
        pairs = _read_jsonl(path)
    else:
        raise DataError(f"{path}: no such file or folder")
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs
