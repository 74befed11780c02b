"""Loading a published policy version into a live vLLM engine, and proving what it holds.

A `WeightsHandle` carries one flat byte buffer (in the Ray object store) and the layout of
the named tensors inside it, in the Hugging Face checkpoint format the engine was built
from. The load is checked against that layout before the engine is touched, so a broken
handle leaves the engine serving its previous weights. The fingerprint is then measured
from the engine's own parameters, not from the handle, so it proves the load happened.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cluster.records import TensorSpec

# Identity rows fed through a packed linear layer at once when reading its weights back.
_PROBE_ROWS = 512
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


class WeightsMismatchError(ValueError):
    """A weights handle that does not fit the engine's model: the message names the tensor."""


def checkpoint_layout(model_path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the safetensors checkpoint at `model_path`.

    Reads only the file headers. This is the layout the engine was loaded from, and the
    layout a published state dict must have.
    """
    from safetensors import safe_open

    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(root.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"{root}: no safetensors checkpoint to take the weight layout from")
    layout = {}
    for name in files:
        with safe_open(root / name, framework="pt") as f:
            for key in f.keys():
                layout[key] = tuple(f.get_slice(key).get_shape())
    return layout


def validate_specs(specs: Iterable[TensorSpec], layout: dict[str, tuple[int, ...]]) -> None:
    """Raise `WeightsMismatchError` unless `specs` holds exactly the layout's names and shapes
    (in floating-point dtypes; the engine casts them to its own dtype)."""
    specs = list(specs)
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise WeightsMismatchError(f"weights handle: tensor {spec.name!r} appears twice")
        seen.add(spec.name)
        if spec.name not in layout:
            raise WeightsMismatchError(
                f"weights handle: tensor {spec.name!r} is not a weight of the engine's model")
        if tuple(spec.shape) != tuple(layout[spec.name]):
            raise WeightsMismatchError(
                f"weights handle: tensor {spec.name!r} has shape {tuple(spec.shape)}, "
                f"the engine's model expects {tuple(layout[spec.name])}")
        if spec.dtype not in _ITEMSIZE:
            raise WeightsMismatchError(
                f"weights handle: tensor {spec.name!r} has dtype {spec.dtype}, expected a float dtype")
    missing = [name for name in layout if name not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsMismatchError(
            f"weights handle: tensor {missing[0]!r}{more} of the engine's model is missing")


def validate_buffer(nbytes: int, specs: Iterable[TensorSpec]) -> None:
    """Raise `WeightsMismatchError` when a tensor of `specs` reaches past a buffer of `nbytes`."""
    for spec in specs:
        numel = 1
        for dim in spec.shape:
            numel *= dim
        end = spec.offset + numel * _ITEMSIZE[spec.dtype]
        if end > nbytes:
            raise WeightsMismatchError(
                f"weights handle: tensor {spec.name!r} ends at byte {end}, "
                f"past the end of the {nbytes}-byte buffer")


def load_into_engine(llm: Any, tensors: Iterable[tuple[str, Any]]) -> None:
    """Copy named checkpoint-format tensors into the live engine and drop its prefix cache.

    vLLM's in-place reload maps checkpoint names onto its fused parameters (q/k/v, gate/up)
    and re-runs the per-layer processing (on CPU: repacking linear weights for oneDNN).
    Tensors are consumed in the given order; grouping them by layer keeps the reload's
    staging buffers small.
    """
    items = iter(tensors)
    llm.collective_rpc(lambda worker: worker.reload_weights(weights_iterator=items))
    # Cached prefixes hold keys and values computed by the old weights.
    llm.reset_prefix_cache()


def engine_fingerprint(llm: Any) -> tuple[float, float]:
    """(sum, sum of squares) in float64 over every weight the engine computes with.

    Invariant to vLLM fusing q/k/v or gate/up and to zero vocab padding, so it equals
    `cluster.records.fingerprint` of the checkpoint-format state dict that was loaded.
    """
    (result,) = llm.collective_rpc(lambda worker: _model_fingerprint(worker.model_runner.model))
    return result


def _model_fingerprint(model: Any) -> tuple[float, float]:
    import torch

    total, squares = 0.0, 0.0
    with torch.inference_mode():
        for param in model.parameters():
            p64 = param.detach().to(torch.float64)
            total += float(p64.sum())
            squares += float((p64 * p64).sum())
        for module in model.modules():
            if _is_packed_linear(module):
                s, q = _packed_linear_sums(module)
                total += s
                squares += q
    return total, squares


def _is_packed_linear(module: Any) -> bool:
    """vLLM on CPU moves linear weights into oneDNN handles and leaves an empty parameter."""
    weight = getattr(module, "weight", None)
    return hasattr(module, "cpu_linear") and weight is not None and weight.numel() == 0


def _packed_linear_sums(module: Any) -> tuple[float, float]:
    """Read a packed weight W (N, K) back through the engine's own kernel: rows of the
    identity give columns of W exactly (each output is one weight times 1 plus zeros)."""
    import torch

    in_features = module.input_size_per_partition
    total, squares = 0.0, 0.0
    for start in range(0, in_features, _PROBE_ROWS):
        rows = min(_PROBE_ROWS, in_features - start)
        eye = torch.zeros(rows, in_features, dtype=module.weight.dtype)
        eye[:, start:start + rows] = torch.eye(rows, dtype=module.weight.dtype)
        block = module.cpu_linear(eye, module.weight, None).to(torch.float64)  # (rows, N) = W[:, cols].T
        total += float(block.sum())
        squares += float((block * block).sum())
    return total, squares
