"""Weight transport: how a policy version travels from the learner into the rollout engines,
and how an engine proves what it holds.

The interface is two calls. The learner `publish`es named tensors with a version and gets a
`WeightsHandle`; an actor `fetch`es the handle's tensors (zero-copy views) and loads them
into its engine. `ObjectStoreTransport` is the first implementation: every tensor of a
version goes into the Ray object store as one object (a tuple of numpy arrays, which
`ray.get` maps without copying). A collective transport (NCCL, vLLM's weight-transfer
engines) is another class with the same two methods.

Proof. With every version the learner publishes *probes*: for each 2-D weight W (N, K) the
projection W @ x_K onto a fixed random vector x_K (seeded by K, the same in every process),
for each 1-D weight the weight itself. One matrix-vector product per weight, in float32,
about one read of the weights. An engine computes the same projections from the weights it
computes with (through its own kernels where it keeps them packed), and `compare_probes`
checks them tensor by tensor. Fused weights (q/k/v, gate/up) project to the concatenation
of their parts' projections, so the check needs only the engine's fusion map. A change in
any tensor moves its projection: one optimizer step at lr 1e-6 moves it by about lr / |W|
(5e-5 relative at |W| ~ 0.02), far above float32 rounding (about 1e-7). A 1-D weight near 1
(a norm) would move by only 1e-6 relative: an engine holds those as copies, and the actors
compare them bit for bit (`compare_probes`' `exact`)."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

# Probe agreement bounds, relative to the projection's size (its RMS): float32 rounding of one
# dot product is about 1e-7 of it; a real difference (another version, a corrupted tensor, a
# load that did not happen) is orders of magnitude above.
PROBE_RMS_TOL = 1e-5
"""Largest RMS of (measured - expected) / RMS(expected) over one tensor's projection."""
PROBE_MAX_TOL = 1e-4
"""Largest single |measured - expected| / max|expected| of one tensor's projection."""
BUCKET_BYTES = 256 * 2**20
"""Tensors go into the object store in objects of about this size, each as soon as it is full,
so a sharded learner's rank 0 holds one bucket of gathered tensors at a time, never the whole
policy beside the store's copy; an actor maps every bucket without copying."""
_ROWS_PER_CHUNK = 8192  # rows cast to float32 at a time: no full-size copy of a large weight
_KERNEL = " (kernel"


def kernel_probe_name(weight: str, module: str) -> str:
    """The name of an engine probe taken through a kernel's own copy of a readable weight
    (vLLM's CPU LM head computes the logits with one, beside its parameter): `weight (kernel)`,
    or `weight (kernel of module)` when the module computes with another module's weight (a
    tied LM head). Checked against the same published tensor as the parameter."""
    return f"{weight}{_KERNEL})" if weight == f"{module}.weight" else f"{weight}{_KERNEL} of {module})"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    """The tensor's name in the Hugging Face checkpoint format the engines were built from."""
    shape: tuple[int, ...]
    dtype: str
    """torch dtype name ("float32", "bfloat16", ...): what the bytes hold."""


@dataclass(frozen=True)
class WeightsHandle:
    """A published policy version: its tensors and probes in the Ray object store."""

    version: int
    tensors: tuple
    """ray.ObjectRefs of tuples of numpy arrays (bfloat16 as int16), in the order of `specs`:
    one object per bucket of about `BUCKET_BYTES`."""
    specs: tuple[TensorSpec, ...]
    probes: Any
    """ray.ObjectRef of {name: float32 projection} (see the module docstring)."""
    nbytes: int


# --------------------------------------------------------------------------- probes


@lru_cache(maxsize=64)
def _probe_vector_cpu(width: int):
    import torch

    return torch.randn(width, generator=torch.Generator().manual_seed(width), dtype=torch.float32)


def probe_vector(width: int, device: Any = "cpu", dtype: Any = None):
    """x_K: the fixed standard-normal probe for inputs of width K, seeded by K."""
    x = _probe_vector_cpu(width)
    return x.to(device=device, dtype=dtype or x.dtype)


def probe(tensor: Any, dtype: Any = None):
    """The probe of one weight, on its own device, of its values cast to `dtype` (the
    transport's) when given: W @ x_K for W of shape (..., K), flattened to (N, K); the values
    themselves for a 1-D weight. Float32; large weights go in row chunks, so no float32 copy
    of a whole low-precision weight is made. -> (N,)"""
    import torch

    t = tensor.detach()
    cast = dtype if dtype is not None and dtype != t.dtype else None
    if t.ndim <= 1:
        return (t.to(cast) if cast else t).reshape(-1).float()
    rows = t.reshape(-1, t.shape[-1])
    x = probe_vector(t.shape[-1], t.device)
    if rows.dtype == torch.float32 and cast is None:
        return rows @ x
    return torch.cat([(chunk.to(cast) if cast else chunk).float() @ x for chunk in rows.split(_ROWS_PER_CHUNK)])


def probes_of(named: Iterable[tuple[str, Any]], dtype: Any = None) -> dict[str, np.ndarray]:
    """{name: probe} of named tensors (cast to `dtype` when given), float32 numpy on the host."""
    return {name: probe(t, dtype).cpu().numpy() for name, t in named}


@dataclass(frozen=True)
class ProbeCheck:
    """What `compare_probes` found: the worst tensor and how far it was off."""

    ok: bool
    worst: str | None
    """The tensor (engine name) with the largest relative RMS difference."""
    rms_error: float
    max_error: float
    problem: str | None = None
    """Why the check failed, naming the tensor."""


def compare_probes(
    measured: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    fused: Mapping[str, Iterable[str]] = {},
    exact: Collection[str] = (),
) -> ProbeCheck:
    """Check an engine's probes (by engine tensor name) against the published ones (by
    checkpoint name). `fused` maps an engine module name to the checkpoint modules it
    concatenates (vLLM's `packed_modules_mapping`, e.g. qkv_proj -> q_proj, k_proj, v_proj).
    An engine projection may be longer than the expected one (vocabulary padding): the extra
    entries are not compared. A kernel's probe (`kernel_probe_name`) is checked against the
    weight it names. Every published tensor must be covered.

    `exact` names published tensors whose probe is the tensor itself (1-D: norms, biases):
    an engine holds a copy of those, so they must agree bit for bit. Within the tolerance
    a norm weight near 1 could miss an optimizer step at lr 1e-6 unseen."""
    covered: set[str] = set()
    worst, worst_rms, worst_max = None, 0.0, 0.0
    for name, got in measured.items():
        parts = checkpoint_names(name.split(_KERNEL)[0], expected, fused)
        if parts is None:
            return ProbeCheck(False, name, np.inf, np.inf, f"engine tensor {name!r} has no published counterpart")
        covered.update(parts)
        want = np.concatenate([expected[p] for p in parts]).astype(np.float64)
        got = np.asarray(got, dtype=np.float64)
        if got.shape[0] < want.shape[0]:
            return ProbeCheck(
                False,
                name,
                np.inf,
                np.inf,
                f"engine tensor {name!r} has {got.shape[0]} rows, the published {len(want)}",
            )
        diff = got[: want.shape[0]] - want
        scale = max(float(np.sqrt(np.mean(want * want))), 1e-30)
        rms = float(np.sqrt(np.mean(diff * diff))) / scale
        peak = float(np.abs(diff).max()) / max(float(np.abs(want).max()), 1e-30)
        if not np.isfinite(rms) or rms > worst_rms or worst is None:
            worst, worst_rms = name, rms
        worst_max = max(worst_max, peak)
        copied = all(p in exact for p in parts)
        if not (peak == 0.0 if copied else rms <= PROBE_RMS_TOL and peak <= PROBE_MAX_TOL):
            return ProbeCheck(
                False,
                name,
                rms,
                peak,
                f"engine tensor {name!r} differs from the published weights "
                f"(relative RMS {rms:.2e}, largest {peak:.2e})",
            )
    missing = [name for name in expected if name not in covered]
    if missing:
        return ProbeCheck(False, missing[0], np.inf, np.inf, f"published tensor {missing[0]!r} is not in the engine")
    return ProbeCheck(True, worst, worst_rms, worst_max)


def checkpoint_names(
    engine_name: str, expected: Mapping[str, Any], fused: Mapping[str, Iterable[str]]
) -> list[str] | None:
    """The checkpoint tensors (names in `expected`) an engine tensor holds: itself, or the
    parts a fused module joins (`fused`: vLLM's `packed_modules_mapping`); None if neither."""
    if engine_name in expected:
        return [engine_name]
    parts = engine_name.split(".")
    for i, part in enumerate(parts):
        if part in fused:
            names = [".".join(parts[:i] + [p] + parts[i + 1 :]) for p in fused[part]]
            if all(n in expected for n in names):
                return names
    return None


# --------------------------------------------------------------------------- tensors <-> arrays


def export_tensors(
    named: Iterable[tuple[str, Any]], dtype: Any = None, staging: dict[str, Any] | None = None
) -> tuple[list[np.ndarray], tuple[TensorSpec, ...]]:
    """Host arrays of named tensors for the object store, in the transport `dtype`.

    A CPU tensor already in that dtype is handed over as a view (no copy: `ray.put` makes the
    one copy). A cast or a device tensor is copied once into `staging` (reused across
    versions, pinned on CUDA), with one synchronise at the end."""
    import torch

    arrays, specs = [], []
    copies = False
    for name, t in named:
        t = t.detach()
        want = dtype or t.dtype
        if t.device.type == "cpu" and t.dtype == want and t.is_contiguous():
            host = t
        else:
            host = staging.get(name) if staging is not None else None
            if host is None or host.shape != t.shape or host.dtype != want:
                host = torch.empty(t.shape, dtype=want, pin_memory=t.device.type == "cuda")
                if staging is not None:
                    staging[name] = host
            host.copy_(t, non_blocking=True)
            copies = copies or t.device.type != "cpu"
        specs.append(TensorSpec(name, tuple(t.shape), str(want).removeprefix("torch.")))
        arrays.append((host.view(torch.int16) if want == torch.bfloat16 else host).numpy())
    if copies:
        torch.cuda.synchronize()
    return arrays, tuple(specs)


def import_tensors(arrays: Iterable[np.ndarray], specs: Iterable[TensorSpec]) -> dict[str, Any]:
    """Torch views (no copy) of the arrays `export_tensors` made, by name."""
    import torch

    out = {}
    with warnings.catch_warnings():
        # ray.get hands out read-only shared memory; the views are only ever read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for array, spec in zip(arrays, specs, strict=True):
            t = torch.from_numpy(array)
            out[spec.name] = t.view(torch.bfloat16) if spec.dtype == "bfloat16" else t
    return out


class WeightTransport(Protocol):
    """How a policy version travels from the learner to the rollout engines. A second
    transport (a collective one between GPUs, say) is one new class with these methods; the
    learner and the actors call nothing else."""

    def publish(self, named: Iterable[tuple[str, Any]], version: int, dtype: Any = None) -> WeightsHandle:
        """Learner side: make version `version` of the named tensors (cast to `dtype`)
        available, with their probes."""
        ...

    def fetch(self, handle: WeightsHandle) -> dict[str, Any]:
        """Actor side: the handle's tensors by name, ready to load into an engine."""
        ...

    def probes(self, handle: WeightsHandle) -> dict[str, np.ndarray]:
        """Actor side: the published probes, to check the engine's own against
        (`compare_probes`)."""
        ...


class ObjectStoreTransport:
    """`WeightTransport` through the Ray object store: one object per version, zero-copy
    reads."""

    def __init__(self):
        self._staging: dict[str, Any] = {}

    def publish(self, named: Iterable[tuple[str, Any]], version: int, dtype: Any = None) -> WeightsHandle:
        """Put the named tensors (cast to `dtype` when given) and their probes into the store,
        in objects of about `BUCKET_BYTES`, each put as soon as it is full."""
        import ray

        probes: dict[str, np.ndarray] = {}
        buckets, specs, nbytes = [], [], 0
        pending: list[tuple[str, Any]] = []
        pending_bytes = 0

        def put() -> None:
            nonlocal pending_bytes, nbytes
            arrays, bucket_specs = export_tensors(pending, dtype, self._staging)
            buckets.append(ray.put(tuple(arrays)))
            specs.extend(bucket_specs)
            nbytes += sum(int(a.nbytes) for a in arrays)
            pending.clear()
            pending_bytes = 0

        # One tensor at a time (a sharded learner gathers each as it comes), probed where it
        # lives (on the GPU, say), as sent: after the cast.
        for name, tensor in named:
            probes[name] = probe(tensor, dtype).cpu().numpy()
            pending.append((name, tensor))
            pending_bytes += tensor.numel() * (dtype or tensor.dtype).itemsize
            if pending_bytes >= BUCKET_BYTES:
                put()
        if pending or not buckets:
            put()
        return WeightsHandle(
            version=version, tensors=tuple(buckets), specs=tuple(specs), probes=ray.put(probes), nbytes=nbytes
        )

    @staticmethod
    def fetch(handle: WeightsHandle) -> dict[str, Any]:
        """The handle's tensors as read-only torch views of the object store's memory."""
        import ray

        arrays = [array for bucket in ray.get(list(handle.tensors)) for array in bucket]
        return import_tensors(arrays, handle.specs)

    @staticmethod
    def probes(handle: WeightsHandle) -> dict[str, np.ndarray]:
        import ray

        return handle.probes if isinstance(handle.probes, dict) else ray.get(handle.probes)
