"""LoRA versions in a live vLLM engine: loaded from memory, proven from the engine's own slots.

With `learner.lora` the engine is built with LoRA enabled (`cluster.shared.lora.engine_args`)
and serves each policy version as an adapter of its own id (`adapter_id`), as vLLM's prefix
cache needs (it keys cached blocks by adapter). No file is written on the way: the engine
runs in the actor's process, so the worker's LoRA manager takes the published tensors
directly (`LoRAModel.from_lora_tensors`) and copies them into a slot of its stacked LoRA
weights, where the kernels read them.

Proof reads those slots back, not the tensors handed in: for every adapter layer of the
engine, A and B of the version's slot (B divided by alpha / rank, which vLLM folds into it),
split into the checkpoint modules a fused layer joins (q/k/v, gate/up), probed as the learner
probed what it published (`cluster.shared.transport.probe`). A load that did not happen finds
no slot; a tensor changed on the way differs in its probe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cluster.shared.config import LoRAConfig
from cluster.shared.lora import adapter_modules, scale

PREFIX = "base_model.model."
"""What peft puts before a module's name in the adapter's tensor names."""


def adapter_id(version: int) -> int:
    """The engine's adapter id of a policy version (vLLM's ids start at 1)."""
    return version + 1


def lora_request(version: int) -> Any:
    """The `LoRARequest` a generation call under `version` runs with. Its path is never read:
    the adapter is registered from memory before any call uses it."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"tame-v{version}", adapter_id(version), f"tame://in-memory/v{version}")


def load_adapter(llm: Any, tensors: Mapping[str, Any], version: int, lora: LoRAConfig) -> None:
    """Register `version`'s adapter (published tensors, by peft name) in the engine and put it
    into a slot of the LoRA weights the kernels compute with."""
    config = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": adapter_modules(tensors), "bias": "none"}
    llm.collective_rpc(lambda worker: _load(worker, tensors, adapter_id(version), config))


def _load(worker: Any, tensors: Mapping[str, Any], lora_id: int, config: dict) -> None:
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    helper = PEFTHelper.from_dict(config)
    helper.validate_legal(manager.lora_config)
    # from_lora_tensors copies each tensor (into the engine's LoRA dtype): the object store's
    # read-only views are not kept.
    model = LoRAModel.from_lora_tensors(
        lora_id, dict(tensors), helper, device="cpu", dtype=manager.lora_config.lora_dtype
    )
    adapters = manager._adapter_manager
    adapters.add_adapter(model)
    adapters.activate_adapter(lora_id)


def remove_adapter(llm: Any, version: int) -> None:
    """Drop `version`'s adapter from the engine (its slot and its host copy)."""
    llm.collective_rpc(lambda worker: worker.model_runner.lora_manager.remove_adapter(adapter_id(version)))


def adapter_probes(llm: Any, version: int, lora: LoRAConfig) -> dict[str, np.ndarray]:
    """The probes of `version`'s adapter as the engine holds it in its slot, by published tensor
    name: empty when the adapter is in no slot."""
    (probes,) = llm.collective_rpc(lambda worker: _slot_probes(worker, adapter_id(version), lora))
    return probes


def _slot_probes(worker: Any, lora_id: int, lora: LoRAConfig) -> dict[str, np.ndarray]:
    import torch

    from cluster.shared.transport import probe

    adapters = worker.model_runner.lora_manager._adapter_manager
    if lora_id not in adapters.lora_index_to_id:
        return {}
    slot = adapters.lora_index_to_id.index(lora_id)
    packed = adapters.packed_modules_mapping
    out = {}
    with torch.inference_mode():
        for module_name, module in adapters.modules.items():
            a_stacked, b_stacked = getattr(module, "lora_a_stacked", None), getattr(module, "lora_b_stacked", None)
            if not isinstance(a_stacked, tuple) or not isinstance(b_stacked, tuple):
                continue  # not a linear layer (embeddings, LM head): no adapter of ours there
            prefix, _, last = module_name.rpartition(".")
            parts = packed.get(last, [last])
            if len(parts) != len(a_stacked):
                continue
            for part, a, b in zip(parts, a_stacked, b_stacked):
                name = f"{PREFIX}{prefix}.{part}.lora_"
                out[f"{name}A.weight"] = probe(a[slot, 0, : lora.rank]).cpu().numpy()
                # vLLM multiplied B by the scale when it took the adapter; a power of two (or
                # float32) makes the division exact.
                out[f"{name}B.weight"] = probe(b[slot, 0, :, : lora.rank].float() / scale(lora)).cpu().numpy()
    return out
