"""vLLM's CPU LoRA kernels, with a dense fast path for a step that runs under one adapter.

vLLM's CPU punica wrapper (`vllm/lora/punica_wrapper/punica_cpu.py`) serves a batch that may
mix adapters: for every token it gathers that token's A and B out of the stacked slots
(`lora_a_stacked[indices]`, a copy of T x rank x in floats per layer) and multiplies them one
token at a time (`torch_ops.bgmv_*`). On CPU that gather is most of a decode step: with it,
the small model served an adapter at a quarter of the tokens/s of the same engine without
LoRA, and the cost grows with the rank (docs/lora.md, "What it costs and saves").

tame never mixes: every generation call runs under exactly one adapter, that of the version
it started under. So when all tokens of a step use one slot, the adapter is two plain matmuls
per slice, x @ A.T (times the scale) and then @ B.T, on that slot's weights in place, in the
dtypes vLLM's ops use (float32 between A and B). Steps that mix slots go to vLLM's own code.

`single_adapter_kernels` installs the wrapper while an engine is built on CPU (the LoRA
manager asks the platform for its wrapper then, `get_punica_wrapper`); other platforms keep
theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

NO_ADAPTER = -1
"""The slot index vLLM gives a token that runs without an adapter."""


class SingleAdapterPunicaCPU(PunicaWrapperCPU):
    """`PunicaWrapperCPU` that computes a step whose tokens all use one slot with dense matmuls."""

    slot: int | None = None
    """The slot every token (and every sampled row) of the current step uses: `NO_ADAPTER`
    when none uses one, None when they differ (vLLM's per-token kernels then run)."""

    def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kwargs: Any) -> None:
        # vLLM calls this whenever the batch's mapping or the slots' contents change, so the
        # slot read here holds for every kernel of the steps until the next call.
        super().update_metadata(mapping, lora_index_to_id, *args, **kwargs)
        slots = torch.cat((self.token_lora_indices, self.sampler_indices)).unique()
        self.slot = int(slots[0]) if len(slots) == 1 else None

    def _apply_shrink(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float) -> None:
        """y[:, :rank] = scale * x @ A.T, with A = w_t_all[slot, 0] (rank x in); y is float32."""
        if self.slot is None:
            return super()._apply_shrink(y, x, w_t_all, scale)
        if self.slot == NO_ADAPTER:
            return None  # the buffer stays zero, as in vLLM's no-LoRA path
        y = y.view(-1, y.shape[-1])  # (T, rank)
        a = w_t_all[self.slot, 0]  # (rank, in)
        # One BLAS call, product and scale (beta=0: y's old values are not read).
        y[:, : a.shape[0]].addmm_(x.to(y.dtype), a.to(y.dtype).T, beta=0, alpha=scale)
        return None

    def _apply_expand(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        y_offset: int,
        y_slice_size: int,
        add_inputs: bool = True,
    ) -> None:
        """y[:, offset:offset+size] (+)= x @ B.T, with B = w_t_all[slot, 0] (size x rank), in y's dtype."""
        if self.slot is None:
            return super()._apply_expand(y, x, w_t_all, y_offset, y_slice_size, add_inputs)
        if self.slot == NO_ADAPTER:
            return None
        b = w_t_all[self.slot, 0]  # (size, rank)
        target = y[:, y_offset : y_offset + y_slice_size]  # (T, size), a view of y
        target.addmm_(x.to(y.dtype), b.to(y.dtype).T, beta=1 if add_inputs else 0)
        return None


QUALNAME = f"{SingleAdapterPunicaCPU.__module__}.{SingleAdapterPunicaCPU.__qualname__}"


@contextmanager
def single_adapter_kernels() -> Iterator[None]:
    """While an engine is built in this process on CPU, its LoRA layers get `SingleAdapterPunicaCPU`."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        yield
        return
    # An attribute of the platform object shadows its class's method for this build alone.
    current_platform.get_punica_wrapper = lambda: QUALNAME
    try:
        yield
    finally:
        del current_platform.get_punica_wrapper
