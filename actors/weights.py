"""Loading a published policy version into a live vLLM engine, and proving what it holds.

A `WeightsHandle` (`cluster.shared.transport`) names its tensors and their shapes in the Hugging
Face checkpoint format the engine was built from. The load is checked against that layout
before the engine is touched, so a broken handle leaves the engine serving its previous
weights. Afterwards the engine's probes are measured from the weights it computes with, not
from the handle, and compared with the published ones: that proves the load happened.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cluster.shared.transport import TensorSpec

# Identity rows fed through a packed linear layer at once when reading its weights back.
_PROBE_ROWS = 512
_FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


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
        if spec.dtype not in _FLOAT_DTYPES:
            raise WeightsMismatchError(
                f"weights handle: tensor {spec.name!r} has dtype {spec.dtype}, expected a float dtype")
    missing = [name for name in layout if name not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsMismatchError(
            f"weights handle: tensor {missing[0]!r}{more} of the engine's model is missing")


def load_into_engine(llm: Any, tensors: Iterable[tuple[str, Any]]) -> None:
    """Copy named checkpoint-format tensors into the live engine and drop its prefix cache.

    vLLM's in-place reload maps checkpoint names onto its fused parameters (q/k/v, gate/up)
    and re-runs the per-layer processing (on CPU: repacking linear weights for oneDNN).
    Tensors are consumed in the given order; grouping them by layer keeps the reload's
    staging buffers small.

    An LM head tied to the embedding receives no tensor of its own, so vLLM does not re-run
    its processing: on CPU its logits kernel would keep the old weights (the probes catch
    that). It is re-run here for every tied head.
    """
    items = iter(tensors)
    llm.collective_rpc(lambda worker: _reload(worker, items))
    # Cached prefixes hold keys and values computed by the old weights.
    llm.reset_prefix_cache()


def _reload(worker: Any, items: Iterable[tuple[str, Any]]) -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

    worker.reload_weights(weights_iterator=items)
    model = worker.get_model()
    shared = {id(m.weight) for m in model.modules() if not isinstance(m, ParallelLMHead) and hasattr(m, "weight")}
    for head in model.modules():
        if (isinstance(head, ParallelLMHead) and id(head.weight) in shared
                and isinstance(head.quant_method, UnquantizedEmbeddingMethod)):
            head.quant_method.process_weights_after_loading(head)  # on CPU: a new kernel from the weight


def engine_probes(llm: Any) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The probes (`cluster.shared.transport.probe`) of every weight the engine computes with, by
    engine tensor name, and the engine's fusion map (vLLM's `packed_modules_mapping`).

    Readable weights are probed directly. vLLM on CPU also hands a linear layer's weight to a
    oneDNN kernel that keeps its own packed copy: the decoder's linear layers (their
    parameter left empty) and the LM head, which computes the logits with it beside its
    readable parameter. (The embedding gets such a copy too, which its lookups never use: not
    probed.) Each kernel is probed through itself: x_K in, W @ x_K out, one matrix-vector
    product; in a precision below float32 the kernel's output would be rounded, so its
    weight is read back exactly first (identity rows through the kernel) and probed like a
    readable one. The LM head's kernel is named `lm_head.weight + KERNEL_SUFFIX`: it and the
    parameter must both hold the published weights.
    """
    (result,) = llm.collective_rpc(lambda worker: _model_probes(worker.get_model()))
    return result


def _model_probes(model: Any) -> tuple[dict[str, Any], dict[str, list[str]]]:
    import torch
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from cluster.shared.transport import KERNEL_SUFFIX, probe, probe_vector

    out = {}
    # A tied weight (an LM head that is the embedding, as in many small models) is one tensor
    # under two module names; the checkpoint and the learner name it once, by its first name.
    first: dict[int, str] = {}
    with torch.inference_mode():
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(prefix=module_name, recurse=False):
                own = first.setdefault(id(param), name)
                if param.numel() > 0 and own == name:
                    out[name] = probe(param).cpu().numpy()
                if not (hasattr(module, "cpu_linear") and name == f"{module_name}.weight"):
                    continue
                if param.numel() > 0 and not isinstance(module, ParallelLMHead):
                    continue  # a readable weight the module computes with itself
                key = own if param.numel() == 0 else own + KERNEL_SUFFIX
                width = param.shape[1] if param.numel() > 0 else module.input_size_per_partition
                if param.dtype == torch.float32:
                    x = probe_vector(width)[None, :]
                    out[key] = module.cpu_linear(x, module.weight, None)[0].float().numpy()
                else:
                    out[key] = probe(_read_kernel_weight(module, width)).numpy()
    fused = {k: list(v) for k, v in (getattr(model, "packed_modules_mapping", None) or {}).items()}
    return out, fused


def _read_kernel_weight(module: Any, in_features: int) -> Any:
    """A linear layer's weight W (N, K) read back exactly through the engine's own kernel:
    rows of the identity give columns of W (each output is one weight times 1 plus zeros)."""
    import torch

    columns = []
    for start in range(0, in_features, _PROBE_ROWS):
        rows = min(_PROBE_ROWS, in_features - start)
        eye = torch.zeros(rows, in_features, dtype=module.weight.dtype)
        eye[:, start:start + rows] = torch.eye(rows, dtype=module.weight.dtype)
        columns.append(module.cpu_linear(eye, module.weight, None))  # (rows, N) = W[:, cols].T
    return torch.cat(columns).T
