"""Read back what a run logged to wandb in offline mode, from its `run-*.wandb` file.

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a
7-byte header (crc32 u32, length u16, type u8: FULL=1, FIRST=2, MIDDLE=3, LAST=4); the
chunks join into protobuf `Record`s of wandb's internal schema.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    pos, parts = 7, []  # skip the file header (magic, version)
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # too little room left for a chunk header: the block ends in padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            parts = [chunk]
        else:
            parts.append(chunk)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def history(run_dir: Path) -> list[dict]:
    """Every `wandb.log` row of the offline runs under run_dir (oldest first), as dicts."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline wandb run under {run_dir}"
    rows = []
    for file in files:
        for record in records(file):
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows
