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
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            # rename() cannot replace a non-empty folder: move the old one aside first.
            trash = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
            final.rename(trash / final.name)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Replace the file at `path` whole, through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON to `path`, whole (`write_text`)."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")
