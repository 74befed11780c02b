"""Data files: the one reader of every role's records (prompts, demonstrations, preference
pairs), which names the file and line of a bad one, and the prompt source the controller
hands out from, with a cursor that checkpoints capture.

Exactly-once accounting: every prompt of an epoch leaves the source once; a prompt whose
rollouts are not trained on (its actor died, its score failed, it grew too stale) comes back
through `give_back` and is handed out again before any new prompt.
"""

from __future__ import annotations

import json
import random
import re
from collections import deque
from pathlib import Path

from cluster.config import DataError
from cluster.records import Prompt

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
        raise DataError(f"{path}: a saved Hugging Face dataset needs the `datasets` package "
                        "(pip install datasets), or export it to JSONL") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    return [(f"{path}: row {i}", dict(row)) for i, row in enumerate(loaded)]


def _messages(row: dict, where: str) -> tuple[tuple[str, str], ...]:
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        out = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES \
                    or not isinstance(turn.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be {{\"role\": one of {ROLES}, \"content\": str}}")
            out.append((turn["role"], turn["content"]))
        return tuple(out)
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: expected a non-empty string field 'prompt' (or 'messages')")
    return (("user", prompt),)


def load_prompts(path: str | Path) -> list[tuple[tuple[str, str], ...]]:
    """The prompts of a data path (`read_records`), each as chat turns, in order."""
    return [_messages(row, where) for where, row in read_records(path)]


class PromptSource:
    """Hands out prompts epoch by epoch, reshuffled per epoch from (seed, epoch)."""

    def __init__(self, prompts: list[tuple[tuple[str, str], ...]], seed: int, shuffle: bool = True):
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self.returned: deque[str] = deque()
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def prompt(self, prompt_id: str) -> Prompt:
        index = int(prompt_id.split(":")[1])
        return Prompt(prompt_id, self.prompts[index])

    def take(self, n: int) -> list[Prompt]:
        """The next n prompts: given-back ones first, then the epoch's order."""
        out = []
        while len(out) < n and self.returned:
            out.append(self.prompt(self.returned.popleft()))
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            index = self._order[self.position]
            self.position += 1
            out.append(Prompt(f"{self.epoch}:{index}", self.prompts[index]))
        return out

    def give_back(self, prompt_ids) -> None:
        self.returned.extend(prompt_ids)

    def state(self, outstanding: list[str]) -> dict:
        """The cursor for a checkpoint; `outstanding` are prompts handed out but not trained on."""
        return {"epoch": self.epoch, "position": self.position,
                "returned": list(outstanding) + list(self.returned)}

    def restore(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation(self.epoch)
        self.returned = deque(state["returned"])
