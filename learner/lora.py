"""LoRA on the policy (`learner.lora`), with peft; the contract with the actors (names,
layout) is `cluster.shared.lora`.

The policy's base weights are frozen, held in `learner.compute_dtype`; peft adds an adapter to
every targeted linear layer (B starts at zero, so version 0 is the base model), kept in
float32 with its AdamW states. The reference is the same model with the adapter switched off
(`as_reference`): no second copy of the base.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path

import torch

from cluster.shared.config import TameConfig
from cluster.shared.lora import PEFT_ADAPTER, check_targets, peft_config


def wrap(cfg: TameConfig, model: torch.nn.Module) -> torch.nn.Module:
    """`model` (the policy) with a fresh adapter: a peft model whose base is frozen and whose
    adapter is float32."""
    from peft import get_peft_model

    check_targets(cfg.learner.lora, model, cfg.model.policy)
    wrapped = get_peft_model(model, peft_config(cfg.learner.lora), autocast_adapter_dtype=False)
    # Saved in the adapter folder: where `tame export` and peft find the base, from anywhere.
    wrapped.peft_config[PEFT_ADAPTER].base_model_name_or_path = str(Path(cfg.model.policy).resolve())
    for param in wrapped.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    from peft.tuners.lora.layer import Linear

    for module in wrapped.modules():
        if isinstance(module, Linear):
            module.forward = types.MethodType(_fused_forward, module)
    return wrapped


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA `Linear.forward` for the one adapter tame trains, with the adapter's term
    added by one `addmm` onto the base layer's output: base(x) + scale * (x A^T) B^T. peft makes
    three tensors the size of the output on the way (B's product, its scaled copy, the sum) and
    one more in the backward, which on a CPU cost about as much as the rank-16 products
    themselves. Anything else (the adapter switched off, merged, per-item adapters, a variant
    such as DoRA) is peft's own forward."""
    name = PEFT_ADAPTER
    if args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [name]:
        return type(self).forward(self, x, *args, **kwargs)
    if name in self.lora_variant or not isinstance(self.lora_dropout[name], torch.nn.Identity):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    low = torch.nn.functional.linear(x.to(a.dtype), a)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]).to(low.dtype),
        low.reshape(-1, low.shape[-1]),
        b.t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape).to(result.dtype)


def is_lora(model: torch.nn.Module | None) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextlib.contextmanager
def as_reference(policy: torch.nn.Module, reference: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The model that computes the reference: `reference`, or without one a LoRA `policy` with
    its adapter switched off for the duration."""
    if reference is not None:
        yield reference
        return
    with policy.disable_adapter():
        yield policy


def merge(checkpoint: Path, base: str | Path, out: Path, dtype: torch.dtype) -> None:
    """Write the base model with the adapter saved at `checkpoint` merged in, in Hugging Face
    format and `dtype`, with the base's tokenizer: a model vLLM and transformers load as is."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
    merged.to(dtype).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
