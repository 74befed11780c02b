"""The learner's three models, built where they will live.

- The policy: a causal LM, float32 (it trains: master weights for AdamW). With `learner.lora`,
  its base is frozen in the compute dtype and a float32 adapter trains (`learner/lora.py`);
  the reference is then the policy with the adapter off, not a model of its own.
- The frozen reference (the SFT model), unless the actors compute its log-probs. It only
  runs forward passes, so it needs no float32 master: under bfloat16 arithmetic
  (`learner.compute_dtype`, or a sharded learner's `param_dtype`) its linear layers are stored
  in bfloat16, which autocast casts them to anyway, so its log-probs are those of float32
  weights bit for bit; its embeddings and norms, which autocast leaves in float32, stay so.
- The critic (GAE only): a sequence-classification model used per token, float32, from the
  reward model (InstructGPT; its score bias kept) or from the policy's body with a zero head.

One worker builds each with `from_pretrained` and moves it to its device. Several workers
(FSDP2, `learner/sharding.py`) never hold a whole model: each is built on the meta device
(no memory), sharded, given memory on the device for this worker's shards only, and every
worker reads its own rows of each tensor from the safetensors files
(`torch.distributed.checkpoint`'s Hugging Face reader), a slice at a time.

`skeleton` is the meta-device build itself: the memory plan (`learner/memory.py`) counts
parameters from it, so it counts what the learner builds.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from cluster.shared.config import TameConfig
from cluster.shared.hf_folder import checkpoint_dtype, tensor_headers
from cluster.shared.precision import disable_dropout, float32_head, torch_dtype
from cluster.shared.reward_folder import first_reward_model
from cluster.shared.score_head import SCORE_BIAS_KEY, restore_score_bias, set_score_bias
from learner import lora
from learner.sharding import Shards

Role = Literal["policy", "reference", "critic"]


@dataclass(frozen=True)
class Models:
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    """None when the actors compute the reference log-probs (`rollout.reference_logprobs`)."""
    critic: torch.nn.Module | None
    """None without GAE: the other estimators need no value model."""


def roles(cfg: TameConfig) -> dict[Role, str]:
    """The models this learner holds, and the folder each is loaded from."""
    out: dict[Role, str] = {"policy": cfg.model.policy}
    if not cfg.rollout.reference_logprobs and cfg.learner.lora is None:  # LoRA: the policy, adapter off
        out["reference"] = cfg.model.policy
    if cfg.ppo.advantage == "gae":
        reward = cfg.learner.critic == "reward"  # an ensemble's critic starts from its first member
        out["critic"] = str(first_reward_model("model.reward", cfg.model.reward)) if reward else cfg.model.policy
    return out


def reference_dtype(cfg: TameConfig) -> torch.dtype:
    """What the reference's linear layers are stored in: the dtype they compute in."""
    lc = cfg.learner
    if lc.compute_dtype != "float32":
        return torch_dtype(lc.compute_dtype)
    return torch_dtype(lc.param_dtype or "float32")


def load_models(cfg: TameConfig, shards: Shards, device: torch.device) -> Models:
    """The policy, the reference and the critic this learner holds, on `device`, sharded
    over the workers of `shards` (see the module docstring)."""
    built = {role: _load(cfg, role, path, shards, device) for role, path in roles(cfg).items()}
    return Models(built["policy"], built.get("reference"), built.get("critic"))


def skeleton(cfg: TameConfig, role: Role, path: str | Path) -> torch.nn.Module:
    """`role`'s model as the learner builds it, on the meta device: no memory, from its
    config.json alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **({"num_labels": 1} if role == "critic" else {}))
    with torch.device("meta"):
        model = _auto_class(role).from_config(config, dtype=torch.float32)
    if role == "reference":
        _store_linears_in(model, reference_dtype(cfg))
    if role == "critic" and cfg.learner.critic == "reward" and SCORE_BIAS_KEY in tensor_headers(path):
        set_score_bias(model, 0.0)  # the values come from it: loaded below with the rest
    return model


def _load(cfg: TameConfig, role: Role, path: str, shards: Shards, device: torch.device) -> torch.nn.Module:
    if shards.sharded:
        model = skeleton(cfg, role, path)
        _prepare(cfg, role, model)
        shards.shard(model, cfg.learner.param_dtype, cfg.learner.reduce_dtype)
        model.to_empty(device=device)
        _init_non_persistent_buffers(model)
        _read_shards(model, path, fresh=_fresh_keys(cfg, role))
    else:
        with _quiet_loading():
            model = _auto_class(role).from_pretrained(
                path, dtype=_load_dtype(cfg, role), **({"num_labels": 1} if role == "critic" else {})
            )
        if role == "reference":
            _store_linears_in(model, reference_dtype(cfg))
        if role == "critic" and cfg.learner.critic == "reward":
            restore_score_bias(model, path)  # plain from_pretrained drops it (cluster.shared.score_head)
        _prepare(cfg, role, model)
        model.to(device)
        if role == "policy" and cfg.learner.lora is not None:
            model = lora.wrap(cfg, model)
    if role == "critic" and cfg.learner.critic == "policy":
        head = value_head(model)
        with torch.no_grad():  # a fresh value head: every value starts at 0
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
    if role == "reference":
        model.requires_grad_(False)
    if role == "critic":
        # Body and value head in one call, so a sharded critic gathers its root (which holds
        # the head) for it as for a forward pass.
        model.token_values = types.MethodType(token_values, model)
        if shards.sharded:
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(model, "token_values")
    return model


def _load_dtype(cfg: TameConfig, role: Role) -> torch.dtype:
    """float32 master weights for what trains; a LoRA policy's frozen base in the compute dtype."""
    if role == "policy" and cfg.learner.lora is not None:
        return torch_dtype(cfg.learner.compute_dtype)
    return torch.float32


def _auto_class(role: Role):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if role == "critic" else AutoModelForCausalLM


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Loading a causal LM as a sequence classifier (the critic) reports the missing head and
    the unused LM head, and a reward model its score bias (put back): expected, so kept out of
    the logs."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _prepare(cfg: TameConfig, role: Role, model: torch.nn.Module) -> None:
    """What a model needs before it is sharded: no dropout; for the trained ones, layers that
    recompute their activations in the backward pass when asked."""
    disable_dropout(model)
    if role != "reference" and cfg.learner.gradient_checkpointing:
        # Transformers recomputes layers only in train mode; dropout stays off
        # (disable_dropout zeroed every probability).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()


def _store_linears_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Linear layers in `dtype`, but a head tied to the embeddings: the embeddings stay float32."""
    if dtype == torch.float32:
        return
    embeddings = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not embeddings:
            module.to(dtype)


def _fresh_keys(cfg: TameConfig, role: Role) -> set[str]:
    """Tensors a model starts without reading: a critic made from the policy has a new head."""
    return {"score.weight", SCORE_BIAS_KEY} if role == "critic" and cfg.learner.critic == "policy" else set()


def _init_non_persistent_buffers(model: torch.nn.Module) -> None:
    """Buffers that no checkpoint holds (rotary frequencies) were built on the meta device
    without values: transformers' own initialisation computes them, as `from_pretrained` does."""
    for module in model.modules():
        if any(name in module._non_persistent_buffers_set for name, _ in module.named_buffers(recurse=False)):
            model._init_weights(module)


def _read_shards(model: torch.nn.Module, path: str | Path, fresh: set[str]) -> None:
    """Fill this worker's shards of `model` from the safetensors files at `path`: each worker
    reads only its own rows of each tensor, cast on the way into the model's dtypes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model)  # views of the shards: loaded in place
    available = tensor_headers(path)
    tied = _tied_names(model)
    missing = [name for name in state if name not in available and name not in fresh and name not in tied]
    if missing:
        raise ValueError(
            f"{path}: the checkpoint has no tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f" of the {type(model).__name__} transformers builds from its config.json"
        )
    wanted = {name: t for name, t in state.items() if name in available and name not in tied}
    dcp.load(
        wanted,
        storage_reader=HuggingFaceStorageReader(str(path)),
        planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
    )


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (a tied LM head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied


def export_dtypes(cfg: TameConfig) -> dict[str, torch.dtype]:
    """The dtype each trained model is exported in (`learner/checkpoints.py`): that of the
    checkpoint it started from, so an export of a bfloat16 model is bfloat16, as users and the
    engines load it, while the learner trains float32 master weights."""
    return {role: checkpoint_dtype(path) for role, path in roles(cfg).items() if role != "reference"}


def value_head(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head of a sequence-classification model (`score` in most HF models)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear) and head.out_features == 1:
            return head
    raise ValueError(f"{type(model).__name__}: no scalar head (score/classifier) to use as the critic's value head")


def token_values(
    critic: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, offset: int, compute
) -> torch.Tensor:
    """The critic's value of the state before each window token (positions offset .. L-2),
    bound to the critic as `token_values`. The body runs in `compute` (the compute dtype's
    context); the value head in float32, so values keep their precision through GAE and
    whitening. -> (B, W, 1)"""
    with compute:
        hidden = critic.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, L, H)
    window = hidden[:, offset : input_ids.shape[1] - 1]  # (B, W, H)
    return float32_head(value_head(critic), window)  # (B, W, 1): no view, for FSDP's backward hook
