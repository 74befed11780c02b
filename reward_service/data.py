"""Preference pairs for reward-model training: `{"prompt", "chosen", "rejected"}` records.

Read with `cluster.shared.data.read_records` (a JSONL file or a local Hugging Face dataset
folder); a bad record fails with the file and line (or row) that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.shared.data import read_records, string_fields
from cluster.shared.errors import DataError  # the project's data error: the CLI maps it to exit 2

__all__ = ["DataError", "FIELDS", "PreferencePair", "load_preference_pairs"]

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    """The response the labeller preferred."""
    rejected: str


def _pair(record: dict, where: str) -> PreferencePair:
    return PreferencePair(**string_fields(record, where, FIELDS, non_empty=("prompt",)))


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """Every pair of a JSONL file or dataset folder (`cluster.shared.data.read_records`); raises
    DataError naming the file and line of a bad record."""
    return [_pair(record, where) for where, record in read_records(path)]
