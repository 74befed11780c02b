"""Undoing an update that turned non-finite after some of its optimizer steps.

Every minibatch's loss and gradient norm are checked before its optimizer step, so nothing
non-finite is ever applied. What still needs undoing is the finite steps the update made
before: the version must match the weights, so a skipped update leaves weights, optimizer
states and schedules exactly as they were. `HostSnapshot` keeps a copy of them (this worker's
shards: 4 bytes per trained parameter for the weights, 8 for AdamW's moments) in host memory
that is allocated once and reused by every update, pinned when the weights live on a GPU, so
the copy costs no device memory and no allocation per update. An update of one optimizer
step needs no snapshot: its one step is the one checked.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """This worker's part of a tensor: the local shard of a DTensor, a plain tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class HostSnapshot:
    """Weights, optimizer states and schedules of the trained models, copied to host buffers
    on `take` and back on `restore`. Each takes {model name: model}, {model name: its
    optimizer} and {model name: its scheduler}."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._missing: set[tuple] = set()  # optimizer states that did not exist yet
        self._small: dict[str, Any] = {}  # param groups (learning rates) and schedulers

    def take(
        self,
        models: Mapping[str, torch.nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        schedulers: Mapping[str, torch.optim.lr_scheduler.LRScheduler],
    ) -> None:
        """Copy everything the models, their optimizers and schedulers hold that an update changes."""
        self._missing.clear()
        copies = []
        for key, tensor in self._tensors(models, optimizers):
            if tensor is None:
                self._missing.add(key)
                continue
            t = local(tensor).detach()
            held = self._buffers.get(key)
            if held is None or held.shape != t.shape or held.dtype != t.dtype:
                held = self._buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            held.copy_(t, non_blocking=True)
            copies.append(t.is_cuda)
        if any(copies):
            torch.cuda.synchronize()
        self._small = {
            name: (
                [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                copy.deepcopy(schedulers[name].state_dict()),
            )
            for name, optimizer in optimizers.items()
        }

    def restore(
        self,
        models: Mapping[str, torch.nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        schedulers: Mapping[str, torch.optim.lr_scheduler.LRScheduler],
    ) -> None:
        """Put back what `take` copied: the same values, bit for bit."""
        cuda = False
        with torch.no_grad():
            for key, tensor in self._tensors(models, optimizers, without=self._missing):
                t = local(tensor)
                t.copy_(self._buffers[key], non_blocking=True)
                cuda = cuda or t.is_cuda
        if cuda:
            torch.cuda.synchronize()
        for name, index, _ in self._missing:  # states the undone steps created
            optimizer = optimizers[name]
            optimizer.state.pop(_params(optimizer)[index], None)
        for name, optimizer in optimizers.items():
            groups, schedule = self._small[name]
            for group, saved in zip(optimizer.param_groups, groups, strict=True):
                group.update(copy.deepcopy(saved))
            schedulers[name].load_state_dict(schedule)

    @staticmethod
    def _tensors(
        models: Mapping[str, torch.nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        without: set[tuple] = frozenset(),
    ) -> Iterator[tuple[tuple, torch.Tensor | None]]:
        """(key, tensor) of every weight, and of every AdamW state tensor (None where a
        parameter has no state yet: AdamW makes it at its first step); parameters whose
        (optimizer, index, None) key is in `without` are left out."""
        for name, model in models.items():
            for param_name, param in model.named_parameters():
                if param.requires_grad:  # a LoRA policy's frozen base never changes
                    yield (name, param_name), param.data
        for name, optimizer in optimizers.items():
            for index, param in enumerate(_params(optimizer)):
                if (name, index, None) in without:
                    continue
                state = optimizer.state.get(param)
                if not state:
                    yield (name, index, None), None
                    continue
                for field, value in state.items():
                    if isinstance(value, torch.Tensor):
                        yield (name, index, field), value


def _params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]
