"""What `model.reward` may name: one reward model folder, or an ensemble folder.

An ensemble folder (`tame train-rm --members K`) holds `ensemble.json` and one ordinary
reward model folder per member:

    <folder>/ensemble.json   {"members": ["member-0", ...], "seeds": [...], "bootstrap": bool,
                              "accuracy": {"member-0": ..., "ensemble": ...}}
    <folder>/member-0/       a Hugging Face sequence-classification folder
    ...

The reward service loads every member; what needs one model (the critic made from the reward
model, its tokenizer) takes the first. Every role reads the folder through this module, so a
broken `ensemble.json` is the same ConfigError, naming the file, wherever it is found.
"""

from __future__ import annotations

import json
from pathlib import Path

from cluster.shared.errors import ConfigError
from cluster.shared.hf_folder import check_model_folder

ENSEMBLE_FILE = "ensemble.json"

SINGLE = ""
"""The member name of a folder that is one reward model, not an ensemble."""


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def reward_members(name: str, path: str | Path) -> dict[str, Path]:
    """Member name -> model folder, in the ensemble's order: `{SINGLE: path}` for a folder that
    is not an ensemble (whether it is a model folder is the caller's check). A ConfigError
    naming `name` (the config key) and `ensemble.json` when the file is not a list of members
    that are folders inside the ensemble."""
    root = Path(path)
    if not is_ensemble(root):
        return {SINGLE: root}
    manifest = root / ENSEMBLE_FILE
    try:
        members = json.loads(manifest.read_text()).get("members")
    except (ValueError, AttributeError, OSError) as e:
        raise ConfigError(f"{name}: {manifest} is not an ensemble manifest ({e})") from None
    if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
        raise ConfigError(f"{name}: {manifest}: 'members' must be a non-empty list of member folder names")
    if len(set(members)) != len(members):
        raise ConfigError(f"{name}: {manifest}: 'members' names a folder twice")
    folders = {}
    for member in members:
        folder = root / member
        if Path(member).is_absolute() or ".." in Path(member).parts or not folder.is_dir():
            raise ConfigError(f"{name}: {manifest} lists member {member!r}, which is not a folder inside {root}")
        folders[member] = folder
    return folders


def first_reward_model(name: str, path: str | Path) -> Path:
    """The one model folder where one is needed (the critic's init, a tokenizer): the folder
    itself, or an ensemble's first member."""
    return next(iter(reward_members(name, path).values()))


def check_reward_folder(name: str, path: str | Path) -> None:
    """A reward model path the user gave (config key or option `name`): a reward model folder,
    or an ensemble whose every member is one."""
    for folder in reward_members(name, path).values():
        check_model_folder(name, folder, "reward model")
