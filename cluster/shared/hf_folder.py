"""A Hugging Face model folder, as every role reads it: its `config.json`, and its safetensors
checkpoint, one `model.safetensors` or the shards that `model.safetensors.index.json` lists.

Names, shapes and dtypes come from the files' headers alone (the safetensors format opens
with a little-endian u64 length and that many bytes of JSON), so the layout an engine must
be loaded in, or the memory plan of a 7B model, costs no tensor read. Torch is imported only
by what returns a tensor or a dtype: the CLI checks a folder before it imports torch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.shared.errors import UserError

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"

MODEL_KINDS = {"causal LM": "ForCausalLM", "reward model": "ForSequenceClassification"}
"""What a model folder's config.json `architectures` must end with, by kind."""

SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
"""The floating-point dtypes of the safetensors format (as its headers spell them), by torch's names."""


def check_model_folder(name: str, path: str | Path, kind: str) -> None:
    """A model path the user gave (config key or option `name`) must be a Hugging Face folder
    of the expected kind (`MODEL_KINDS`)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise UserError(f"{name}: {path} is not a Hugging Face {kind} folder (no config.json)")
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (ValueError, AttributeError) as e:
        raise UserError(f"{name}: {config} is not a Hugging Face config ({e})") from None
    suffix = MODEL_KINDS[kind]
    if architectures and not any(a.endswith(suffix) for a in architectures):
        raise UserError(f"{name}: {path} holds a {', '.join(architectures)}, not a {kind} (*{suffix})")


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint's files: the shards its index lists, else every `*.safetensors` of the
    folder, sorted; empty for a folder without weights (a config-only one)."""
    root = Path(folder)
    index = root / INDEX
    if index.is_file():
        return [root / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(root.glob("*.safetensors"))


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header describes it."""

    dtype: str
    """As the format spells it: "F32", "BF16", "I64", ..."""
    shape: tuple[int, ...]
    file: Path
    """The file that holds it."""


def file_headers(file: str | Path) -> dict[str, TensorHeader]:
    """Name -> header of every tensor of one safetensors file, in name order."""
    file = Path(file)
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {
        name: TensorHeader(entry["dtype"], tuple(entry["shape"]), file)
        for name, entry in sorted(header.items())
        if name != "__metadata__"
    }


def tensor_headers(folder: str | Path) -> dict[str, TensorHeader]:
    """Name -> header of every tensor of the checkpoint in `folder`, file by file in
    `safetensors_files` order; empty without a checkpoint."""
    headers: dict[str, TensorHeader] = {}
    for file in safetensors_files(folder):
        headers.update(file_headers(file))
    return headers


def read_tensor(folder: str | Path, name: str) -> torch.Tensor | None:
    """One tensor of the checkpoint in `folder`, or None if it has none of that name."""
    from safetensors import safe_open

    header = tensor_headers(folder).get(name)
    if header is None:
        return None
    with safe_open(str(header.file), framework="pt") as f:
        return f.get_tensor(name)


def checkpoint_dtype(folder: str | Path) -> torch.dtype:
    """The dtype the checkpoint in `folder` was saved in: what its config.json says (`dtype`,
    or `torch_dtype` as transformers before 5 wrote it), else the dtype of its first
    floating-point tensor (headers only); float32 when neither says."""
    import torch

    root = Path(folder)
    config = json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else {}
    for key in ("dtype", "torch_dtype"):
        named = getattr(torch, str(config.get(key)), None)
        if isinstance(named, torch.dtype) and named.is_floating_point:
            return named
    for header in tensor_headers(root).values():
        if header.dtype in SAFETENSORS_FLOATS:
            return getattr(torch, SAFETENSORS_FLOATS[header.dtype])
    return torch.float32
