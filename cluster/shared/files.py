"""Writes a reader never sees half done: a folder (a checkpoint, a trained model, the demo
assets) or a JSON file appears under its name complete, or not at all."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `final`; when the block ends without error it
    is renamed to `final` (replacing an older one), so a reader never sees a half-written
    folder under that name. On error the temporary folder is removed."""
    final = Path(final)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        move_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def temporary_sibling(final: str | Path) -> Path:
    """A fresh hidden folder next to `final` (`.tmp-<name>-*`), to be filled and then moved
    into place with `move_into_place`: for a folder filled in several steps, or by another
    thread than the one that made it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))


def move_into_place(tmp: Path, final: str | Path) -> None:
    """Rename the complete folder `tmp` to `final`, replacing an older one."""
    final = Path(final)
    if final.exists():
        # rename() cannot replace a non-empty folder: move the old one aside first.
        trash = _aside(final)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)


def remove_directory(folder: str | Path) -> None:
    """Remove a folder so that no reader sees it half removed: it is moved to a hidden name
    first, and only then deleted."""
    shutil.rmtree(_aside(Path(folder)), ignore_errors=True)


def _aside(folder: Path) -> Path:
    """Move `folder` into a fresh hidden folder next to it (`.old-<name>-*`), which is returned."""
    trash = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=folder.parent))
    folder.rename(trash / folder.name)
    return trash


def write_text(path: str | Path, text: str) -> None:
    """Replace the file at `path` whole, through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON to `path`, whole (`write_text`)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")
