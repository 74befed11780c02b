"""The LoRA adapter's contract between the learner and the actors (`learner.lora`).

A version of a LoRA policy is its adapter alone, named as peft saves it
("base_model.model.<module>.lora_A.weight": A is rank x in, B is out x rank), which is also
what vLLM's LoRA loader reads. `adapter_layout` builds those names and shapes from the
policy's config.json on the meta device, so an actor checks a published version against the
adapter it expects before loading it, as it checks full weights against the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from cluster.shared.config import LoRAConfig, TameConfig
from cluster.shared.errors import ConfigError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The adapter ranks vLLM's engines are built for (`vllm.config.lora.MaxLoRARanks`)."""
PEFT_ADAPTER = "default"
"""The name peft gives the one adapter it trains."""


def peft_config(lora: LoRAConfig) -> Any:
    """peft's `LoraConfig` of `learner.lora`. No dropout: the learner turns dropout off
    everywhere, so the same weights give the same log-probs in the proximal pass and in the
    first step (the PPO ratio starts at 1)."""
    from peft import LoraConfig

    targets = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=targets, bias="none")


def check_targets(lora: LoRAConfig, model: Any, where: str) -> None:
    """Raise a `ConfigError` (exit 2) naming each target module that is no linear layer of
    `model` (the policy at `where`), with the names that are."""
    import torch

    if lora.target_modules == "all-linear":
        return
    head = model.get_output_embeddings()  # vLLM serves no adapter on the LM head
    linear = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
    }
    missing = [t for t in lora.target_modules if t not in linear]
    if missing:
        raise ConfigError(
            f"learner.lora.target_modules: {', '.join(missing)} is not a linear layer of the decoder of the "
            f"policy at {where} (its linear layers: {', '.join(sorted(linear))})"
        )


def adapter_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """The adapter's tensors of a peft model, named as peft saves them (and vLLM loads them):
    its A and B parameters with the adapter's name taken out of theirs, which is what peft's
    `get_peft_model_state_dict` returns (`tests/test_lora.py`) without the walk through the
    whole model's state dict that costs it 60 ms a version at 86M parameters."""
    marker = f".{PEFT_ADAPTER}."
    for name, param in model.named_parameters():
        if marker in name and (".lora_A." in name or ".lora_B." in name):
            yield name.replace(marker, "."), param.detach()


def adapter_layout(cfg: TameConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a version of the adapter publishes, from the policy's
    config.json on the meta device (no memory). Raises a `ConfigError` for targets the policy
    does not have."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.model.policy)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        check_targets(cfg.learner.lora, model, cfg.model.policy)
        model = get_peft_model(model, peft_config(cfg.learner.lora))
    return {name: tuple(t.shape) for name, t in adapter_tensors(model)}


def adapter_modules(names: Iterable[str]) -> list[str]:
    """The modules (q_proj, down_proj, ...) that an adapter's tensors, by peft name, target."""
    return sorted({name.split(".")[-3] for name in names})


def engine_args(lora: LoRAConfig, staleness: int, modules: Iterable[str] | None = None) -> dict:
    """vLLM engine arguments for serving versions of this adapter: a rank slot that holds it
    (vLLM offers ranks 1, 8, 16, 32, ...) and room for every version a call may still use:
    the newest, those `train.max_staleness` lets calls start under, and one being loaded.

    With `modules` (`adapter_modules` of the adapter's layout), vLLM wraps those layers
    alone; by default it also wraps the embeddings and the LM head, which the adapter never
    touches but every step would pay LoRA kernels for."""
    slots = staleness + 2
    rank = min(r for r in VLLM_RANKS if r >= lora.rank)
    args = {"enable_lora": True, "max_lora_rank": rank, "max_loras": slots, "max_cpu_loras": slots}
    if modules is not None:
        args["lora_target_modules"] = list(modules)
    return args


def scale(lora: LoRAConfig) -> float:
    """What the adapter's output is multiplied by: alpha / rank."""
    return lora.alpha / lora.rank
