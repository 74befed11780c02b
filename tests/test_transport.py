"""The weight transport's probes (cluster.shared.transport): what the learner publishes equals what the
sent tensors give, in float32 and bfloat16, and the chunked float32 probe equals the exact
float64 projection on the tiny and small assets."""

from __future__ import annotations

import pytest
import torch

from cluster.shared import transport
from cluster.shared.transport import ObjectStoreTransport, compare_probes, probe, probe_vector, probes_of


@pytest.fixture(scope="module")
def small_assets(tmp_path_factory):
    from cluster.demo.assets import ensure_assets

    return ensure_assets(tmp_path_factory.mktemp("assets") / "small", "small", seed=0, log=lambda *_: None)


def checkpoint(assets) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(assets.policy / "model.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_published_probes_are_those_of_the_tensors_as_sent(tiny_assets, ray_local, dtype):
    state = checkpoint(tiny_assets)
    handle = ObjectStoreTransport().publish(state.items(), version=1, dtype=dtype)
    sent = ObjectStoreTransport.fetch(handle)
    assert {t.dtype for t in sent.values()} == {dtype}
    assert handle.nbytes == sum(t.numel() * t.element_size() for t in sent.values())
    check = compare_probes(probes_of(sent.items()), ObjectStoreTransport.probes(handle))
    assert check.ok and check.rms_error < 1e-6, check
    if dtype == torch.bfloat16:  # the probes are of the rounded values, not of the float32 ones
        assert not compare_probes(probes_of(state.items()), ObjectStoreTransport.probes(handle)).ok


def test_a_version_larger_than_a_bucket_travels_in_several_objects(tiny_assets, ray_local, monkeypatch):
    """Each bucket is put as soon as it is full (a sharded learner's rank 0 then holds one
    bucket of gathered tensors at a time): the objects together hold every tensor, in order."""
    state = checkpoint(tiny_assets)
    largest = max(t.numel() * t.element_size() for t in state.values())
    monkeypatch.setattr(transport, "BUCKET_BYTES", largest)
    handle = ObjectStoreTransport().publish(state.items(), version=1)
    assert 2 < len(handle.tensors) <= len(state)
    assert [s.name for s in handle.specs] == list(state)
    sent = ObjectStoreTransport.fetch(handle)
    assert all(torch.equal(sent[name], t) for name, t in state.items())
    assert handle.nbytes == sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_float32_probe_equals_the_exact_projection(tiny_assets, small_assets, monkeypatch, size, dtype):
    """Row chunks (7 rows here, to cut every tensor) and float32 give W @ x to float32 rounding:
    no full float64 or float32 copy of a weight is needed, on either side."""
    monkeypatch.setattr(transport, "_ROWS_PER_CHUNK", 7)
    state = checkpoint(tiny_assets if size == "tiny" else small_assets)
    for name, weight in state.items():
        exact = weight.to(dtype).double()
        exact = exact @ probe_vector(weight.shape[-1]).double() if weight.ndim == 2 else exact
        got = probe(weight, dtype).double()
        assert got.shape == exact.shape
        rms = float((got - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())
        assert rms < 1e-6, (name, rms)


def test_the_probe_vector_is_the_same_in_every_process():
    # Seeded by the input width alone: learner and engines draw the same x_K.
    assert torch.equal(probe_vector(64), torch.randn(64, generator=torch.Generator().manual_seed(64)))
    assert not torch.equal(probe_vector(64)[:32], probe_vector(32))
