"""Data files: the one reader of every role's records (prompts, demonstrations, preference
pairs), which names the file and line of a bad one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cluster.shared.errors import DataError
from cluster.shared.tokens import prompt_token_ids

ROLES = ("system", "user", "assistant")


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(where, record) for every record of a data path; `where` ("file:line", or "folder: row
    N") is for the caller's own field errors. The one reader of every role's data.

    A path is a JSONL file (one object a line, blank lines skipped) or a local Hugging Face
    dataset folder: one written by `datasets`' `save_to_disk` (its "train" split), or a
    folder of `*.jsonl` files (those with "train" in their name when any do, else all, in
    path order). Raises DataError naming the file and line of the first bad line.
    """
    path = Path(path)
    if path.is_file():
        records = _read_jsonl(path)
    elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        records = _read_saved_dataset(path)
    elif path.is_dir():
        files = sorted(path.rglob("*.jsonl"))
        files = [f for f in files if re.search(r"(?<![a-z])train(?![a-z])", f.name.lower())] or files
        if not files:
            raise DataError(f"{path}: no *.jsonl files in this folder")
        records = [record for f in files for record in _read_jsonl(f)]
    else:
        raise DataError(f"{path}: data file not found")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    records = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            records.append((f"{path}:{n}", record))
    return records


def _read_saved_dataset(path: Path) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: a saved Hugging Face dataset needs the `datasets` package "
            "(pip install datasets), or export it to JSONL"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    return [(f"{path}: row {i}", dict(row)) for i, row in enumerate(loaded)]


def string_fields(row: dict, where: str, names: tuple[str, ...], non_empty: tuple[str, ...] = ()) -> dict[str, str]:
    """The named string fields of a record; a DataError naming `where` and the field when one
    is missing, not a string, or (for `non_empty`) blank. The one check of every role's records."""
    for name in names:
        if name not in row:
            raise DataError(f"{where}: missing field {name!r}")
        if not isinstance(row[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
        if name in non_empty and not row[name].strip():
            raise DataError(f"{where}: field {name!r} is empty")
    return {name: row[name] for name in names}


def _messages(row: dict, where: str) -> tuple[tuple[str, str], ...]:
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        out = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise DataError(f'{where}: messages[{i}] must be {{"role": one of {ROLES}, "content": str}}')
            out.append((turn["role"], turn["content"]))
        return tuple(out)
    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages')")
    return (("user", string_fields(row, where, ("prompt",), non_empty=("prompt",))["prompt"]),)


def load_prompts(path: str | Path) -> list[tuple[tuple[str, str], ...]]:
    """The prompts of a data path (`read_records`), each as chat turns, in order."""
    return [_messages(row, where) for where, row in read_records(path)]


def check_prompt_lengths(path: str | Path, tokenizer: Any, chat_template: bool, limit: int, key: str) -> None:
    """A DataError naming the file and line of the first prompt longer than `limit` tokens as
    the policy sees it (`cluster.shared.tokens.prompt_token_ids`); `key` names the limit."""
    for where, row in read_records(path):
        n = len(prompt_token_ids(tokenizer, _messages(row, where), chat_template))
        if n > limit:
            raise DataError(f"{where}: the prompt is {n} tokens long as the policy sees it, over {key} ({limit})")
