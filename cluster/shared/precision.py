"""How every stage that trains (SFT, reward model, PPO) computes: dtypes, mixed precision,
and no dropout.

Weights and optimizer states stay float32 (master weights): AdamW steps of 1e-6 are below
bfloat16's resolution (2^-8 relative), so bfloat16 weights would round almost every update
away. `compute_context` sets the arithmetic of the forward passes: bfloat16 autocast runs the
matrix products in bfloat16 and keeps reductions such as log-softmax in float32; backward
follows the forward's dtypes. Scalar heads (values, reward scores) compute in float32.
Dropout is off in every model a stage builds (`disable_dropout`), so a forward pass is a
function of the weights and the tokens alone.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """ "float32" -> torch.float32 (names as cluster.shared.config spells them)."""
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


def disable_dropout(model: torch.nn.Module) -> None:
    """Turn off every dropout of a model, also under `train()`.

    With dropout, the log-probs of the same tokens differ between the rollout, the proximal
    pass and the update, so the PPO ratio and the KL would measure noise (N+ paper), and a
    reward model would score the same pair differently from call to call. `eval()` covers
    `nn.Dropout` and the attention dropout that HF models gate on `self.training`. Zeroing
    the rates keeps dropout off in train mode, which gradient checkpointing and reward-model
    training switch on: every `nn.Dropout`'s p, the float rates that layers copy from the
    config at construction (Llama's `attention_dropout`), and the config's own, which some
    layers read at each forward pass and a saved model carries.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        zero_dropout_rates(module)
    if getattr(model, "config", None) is not None:
        zero_dropout_rates(model.config)


def zero_dropout_rates(obj: object) -> None:
    """Set every float attribute of `obj` named `*dropout` to 0: a module, or a model config
    (zeroed before the model is built, a layer that keeps a rate under another name gets 0 too)."""
    for name, value in list(vars(obj).items()):
        if name.endswith("dropout") and isinstance(value, float):
            setattr(obj, name, 0.0)
