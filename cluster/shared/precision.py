"""Dtypes and mixed precision, shared by every stage that trains (SFT, reward model, PPO).

Weights and optimizer states stay float32 (master weights): AdamW steps of 1e-6 are below
bfloat16's resolution (2^-8 relative), so bfloat16 weights would round almost every update
away. `compute_context` sets the arithmetic of the forward passes: bfloat16 autocast runs the
matrix products in bfloat16 and keeps reductions such as log-softmax in float32; backward
follows the forward's dtypes. Scalar heads (values, reward scores) compute in float32.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """"float32" -> torch.float32 (names as cluster.shared.config spells them)."""
    return DTYPES[name]


def compute_context(device: torch.device | str, compute_dtype: str) -> contextlib.AbstractContextManager:
    """The context of a training stage's forward passes: bfloat16 autocast, or none for float32."""
    if compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch_dtype(compute_dtype))


def float32_head(head: torch.nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """A scalar head on features (..., H) in float32, outside any autocast, whatever dtype its
    weights compute in (FSDP's `param_dtype` gathers them in bfloat16)."""
    with torch.autocast(features.device.type, enabled=False):
        bias = None if head.bias is None else head.bias.float()
        return torch.nn.functional.linear(features.float(), head.weight.float(), bias)
