"""Loading a published policy version into a live vLLM engine, and proving what it holds.

A `WeightsHandle` (`cluster.shared.transport`) names its tensors and their shapes in the Hugging
Face checkpoint format the engine was built from. The load is checked against that layout
before the engine is touched, so a broken handle leaves the engine serving its previous
weights. Afterwards the engine's probes are measured from the weights it computes with, not
from the handle, and compared with the published ones: that proves the load happened.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.shared.hf_folder import safetensors_files, tensor_headers
from cluster.shared.transport import TensorSpec, checkpoint_names

# Identity rows fed through a packed linear layer at once when reading its weights back.
_PROBE_ROWS = 512
_FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


class WeightsMismatchError(ValueError):
    """A weights handle that does not fit the engine's model: the message names the tensor."""


def checkpoint_layout(model_path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the safetensors checkpoint at `model_path` (headers
    only). This is the layout the engine was loaded from, and the layout a published state
    dict must have."""
    layout = {name: header.shape for name, header in tensor_headers(model_path).items()}
    if not layout:
        raise FileNotFoundError(f"{model_path}: no safetensors checkpoint to take the weight layout from")
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
            raise WeightsMismatchError(f"weights handle: tensor {spec.name!r} is not a weight of the engine's model")
        if tuple(spec.shape) != tuple(layout[spec.name]):
            raise WeightsMismatchError(
                f"weights handle: tensor {spec.name!r} has shape {tuple(spec.shape)}, "
                f"the engine's model expects {tuple(layout[spec.name])}"
            )
        if spec.dtype not in _FLOAT_DTYPES:
            raise WeightsMismatchError(
                f"weights handle: tensor {spec.name!r} has dtype {spec.dtype}, expected a float dtype"
            )
    missing = [name for name in layout if name not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsMismatchError(f"weights handle: tensor {missing[0]!r}{more} of the engine's model is missing")


def load_into_engine(llm: Any, tensors: Mapping[str, Any], direct: bool, reset_prefix_cache: bool = True) -> str:
    """Copy named checkpoint-format tensors into the live engine and drop its prefix cache
    (not with requests in flight, whose prefixes are cached per version:
    `actors/continuous.py`); returns the path taken, "direct" or "vllm".

    `direct` (on CPU, for an engine `loads_directly` approved): vLLM keeps each linear
    layer's weight only in a oneDNN kernel, and the kernels are rebuilt straight from the
    tensors (`_direct_plan`): one repack per weight, plus one copy where parts are joined
    (q/k/v, gate/up) or cast to the engine's dtype. Otherwise vLLM's in-place reload does
    it: it maps checkpoint names onto its fused parameters, stages every layer's weights in
    fresh memory and re-runs the layer's processing, which makes a load on CPU slower
    (docs/performance.md, "Rollout: weight sync"). Either way the probes check the result.
    """
    (path,) = llm.collective_rpc(lambda worker: _load(worker, tensors, direct))
    if reset_prefix_cache:  # cached prefixes hold keys and values computed by the old weights
        llm.reset_prefix_cache()
    return path


def loads_directly(llm: Any, model_path: str | Path) -> bool:
    """Whether loads into this engine may skip vLLM's reload (`load_into_engine(direct=True)`):
    only on CPU, if the plan covers the model and the engine, as vLLM built it from the
    checkpoint at `model_path`, holds exactly the checkpoint's tensors where the plan would
    put them (one read of the checkpoint, a tensor at a time). A model whose vLLM loader
    changes tensors on the way in (BLOOM's and Falcon's q/k/v reordering, offsets added to
    norms) fails this and keeps vLLM's reload; its loads then fail verification: tame
    cannot check such a model's weights."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    (ok,) = llm.collective_rpc(lambda worker: _holds_checkpoint(worker, model_path))
    return ok


def _holds_checkpoint(worker: Any, model_path: str | Path) -> bool:
    import torch
    from safetensors import safe_open

    from cluster.shared.transport import compare_probes, probes_of

    model = worker.get_model()
    shapes = {name: torch.empty(shape, device="meta") for name, shape in checkpoint_layout(model_path).items()}
    if _direct_plan(model, shapes) is None:
        return False
    expected = {}
    for path in safetensors_files(model_path):
        with safe_open(str(path), framework="pt") as f:  # a tensor at a time, cast as vLLM's loader casts it
            expected.update(probes_of(((name, f.get_tensor(name)) for name in f.keys()), worker.model_config.dtype))
    measured, fused = _model_probes(model)
    return compare_probes(measured, expected, fused).ok


def _load(worker: Any, tensors: Mapping[str, Any], direct: bool) -> str:
    import torch

    model = worker.get_model()
    steps = _direct_plan(model, tensors) if direct else None
    if steps is None:
        # Grouping the tensors by layer (as the checkpoint order does) keeps vLLM's staging small.
        worker.reload_weights(weights_iterator=iter(tensors.items()))
    else:
        with torch.no_grad():
            for step in steps:
                step.run(tensors)
    # Embeddings and LM heads keep a kernel beside their readable weight on CPU (the logits
    # come from one). Rebuilt from the new weight after either path: the direct one does not
    # touch them, and vLLM's reload gives a tied head no tensor of its own, so it would keep
    # the old weights. (On GPUs this does nothing.)
    for module in _embedding_kernels(model):
        module.quant_method.process_weights_after_loading(module)
    return "vllm" if steps is None else "direct"


def _embedding_kernels(model: Any) -> list[Any]:
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    return [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), UnquantizedEmbeddingMethod)]


@dataclass
class _Step:
    """One engine parameter of a direct load: the checkpoint tensors whose rows it joins."""

    module: Any
    name: str
    """The parameter's attribute name on `module` ("weight", "bias")."""
    sources: list[str]
    """Checkpoint tensor names, in the order their rows are joined."""
    kernel: bool
    """A linear layer's weight, which lives only in its oneDNN kernel: the kernel is rebuilt
    from the joined tensors. Otherwise they are copied into the parameter (rows past them,
    an embedding's vocabulary padding, are left alone)."""

    def run(self, tensors: Mapping[str, Any]) -> None:
        import torch

        parts = [tensors[name] for name in self.sources]
        if not self.kernel:
            _copy_rows(getattr(self.module, self.name).data, parts)
            return
        dtype = self.module.params_dtype
        # A view of the object store where the parts lie back to back (the repack reads it in
        # place), else one copy that joins or casts them.
        weight = _rows_in_place(parts) if parts[0].dtype == dtype else None
        if weight is None:
            weight = torch.empty(sum(p.shape[0] for p in parts), parts[0].shape[1], dtype=dtype)
            _copy_rows(weight, parts)
        self.module.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.module.quant_method.process_weights_after_loading(self.module)  # repacks, drops the weight
        if self.module.weight.numel() > 0:  # a kernel that fell back to the weight itself: make it own it
            self.module.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)


def _rows_in_place(parts: list[Any]) -> Any:
    """The parts joined row-wise as one view of their memory, when they lie back to back in
    it (a published version keeps a layer's q/k/v and gate/up so); None otherwise."""
    import numpy as np
    import torch

    first = parts[0]
    if any(
        p.dim() != 2 or not p.is_contiguous() or p.dtype != first.dtype or p.shape[1] != first.shape[1] for p in parts
    ):
        return None
    if any(a.data_ptr() + a.numel() * a.element_size() != b.data_ptr() for a, b in zip(parts, parts[1:])):
        return None
    if len(parts) == 1:
        return first
    # Numpy builds a view past the first part's end (torch would refuse); the check above
    # proves that memory is the other parts, in order. Bytes, so any dtype goes through.
    raw = first.view(torch.uint8).numpy()
    span = np.lib.stride_tricks.as_strided(raw, (sum(p.shape[0] for p in parts), raw.shape[1]), raw.strides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(span).view(first.dtype)


def _copy_rows(out: Any, parts: list[Any]) -> None:
    row = 0
    for part in parts:
        out[row : row + part.shape[0]].copy_(part)
        row += part.shape[0]


def _direct_plan(model: Any, tensors: Mapping[str, Any]) -> list[_Step] | None:
    """The steps of a direct load of `tensors` into `model`, or None when the load must go
    through vLLM's reload: not on a plain CPU (zentorch's kernels may keep the tensor they
    were built from), tensor-parallel, a model with a step of its own after loading, a
    quantized or unknown layer, a linear layer without a kernel of its own, a parameter no
    tensor maps onto (by name, through the model's fusion map), a tensor left over, or a
    shape that does not fit. Nothing is touched here."""
    from vllm.distributed import get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.platforms import current_platform

    if (
        not current_platform.is_cpu()
        or current_platform.is_zen_cpu()
        or get_tensor_model_parallel_world_size() != 1
        or hasattr(model, "process_weights_after_loading")
    ):  # a model-level step after loading
        return None
    fused = _fusion_map(model)
    steps, seen, covered = [], set(), set()
    for module_name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        embedding = isinstance(method, UnquantizedEmbeddingMethod)
        for full, param in module.named_parameters(prefix=module_name, recurse=False):
            if id(param) in seen:
                continue  # a tied weight (an LM head that is the embedding): loaded under its first name
            seen.add(id(param))
            name = full.rsplit(".", 1)[-1]
            sources = checkpoint_names(full, tensors, fused)
            if sources is None or any(tensors[t].ndim == 0 for t in sources):
                return None
            shapes = [tuple(tensors[t].shape) for t in sources]
            rows = sum(shape[0] for shape in shapes)
            if name == "weight" and isinstance(method, UnquantizedLinearMethod):
                if param.numel() > 0:
                    return None  # vLLM left the weight readable: no kernel of its own to rebuild
                out, width = (
                    getattr(module, "output_size_per_partition", None),
                    getattr(module, "input_size_per_partition", None),
                )
                if rows != out or any(shape[1:] != (width,) for shape in shapes):
                    return None
                steps.append(_Step(module, name, sources, kernel=True))
            elif method is None or name == "bias" or embedding:
                fits = rows <= param.shape[0] if embedding else rows == param.shape[0]
                if not fits or any(shape[1:] != tuple(param.shape[1:]) for shape in shapes):
                    return None
                steps.append(_Step(module, name, sources, kernel=False))
            else:
                return None  # quantized, or a kind of layer this plan does not know
            covered.update(sources)
    return steps if covered == set(tensors) else None


def _fusion_map(model: Any) -> dict[str, list[str]]:
    """vLLM's `packed_modules_mapping`: fused module -> the checkpoint modules it joins."""
    return {k: list(v) for k, v in (getattr(model, "packed_modules_mapping", None) or {}).items()}


def engine_probes(llm: Any) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The probes (`cluster.shared.transport.probe`) of every weight the engine computes with, by
    engine tensor name, and the engine's fusion map (vLLM's `packed_modules_mapping`).

    Readable weights are probed directly. vLLM on CPU also hands a linear layer's weight to a
    oneDNN kernel that keeps its own packed copy: the decoder's linear layers (their
    parameter left empty), and the LM head and the embedding beside their readable
    parameter (the logits come from the head's kernel, or from the embedding's in models
    that compute them through it, such as Gemma 2). Each kernel is probed through itself:
    x_K in, W @ x_K out, one matrix-vector product; in a precision below float32 the
    kernel's output would be rounded, so its weight is read back exactly first (identity
    rows through the kernel) and probed like a readable one. A kernel beside a readable
    parameter is named by `cluster.shared.transport.kernel_probe_name`: it and the parameter
    must both hold the published weights.
    """
    (result,) = llm.collective_rpc(lambda worker: _model_probes(worker.get_model()))
    return result


def _model_probes(model: Any) -> tuple[dict[str, Any], dict[str, list[str]]]:
    import torch

    from cluster.shared.transport import kernel_probe_name, probe, probe_vector

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
                key = own if param.numel() == 0 else kernel_probe_name(own, module_name)
                width = param.shape[1] if param.numel() > 0 else module.input_size_per_partition
                if param.dtype == torch.float32:
                    x = probe_vector(width)[None, :]
                    out[key] = module.cpu_linear(x, module.weight, None)[0].float().numpy()
                else:
                    out[key] = probe(_read_kernel_weight(module, width)).numpy()
    return out, _fusion_map(model)


def _read_kernel_weight(module: Any, in_features: int) -> Any:
    """A linear layer's weight W (N, K) read back exactly through the engine's own kernel:
    rows of the identity give columns of W (each output is one weight times 1 plus zeros)."""
    import torch

    columns = []
    for start in range(0, in_features, _PROBE_ROWS):
        rows = min(_PROBE_ROWS, in_features - start)
        eye = torch.zeros(rows, in_features, dtype=module.weight.dtype)
        eye[:, start : start + rows] = torch.eye(rows, dtype=module.weight.dtype)
        columns.append(module.cpu_linear(eye, module.weight, None))  # (rows, N) = W[:, cols].T
    return torch.cat(columns).T
