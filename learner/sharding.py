"""One logical learner over N processes: a torch.distributed group and FSDP2.

Each worker holds 1/N of every weight, gradient and optimizer state (`fully_shard` per
decoder layer, then the root), and gathers one layer at a time for its passes. The rule
that keeps N workers exactly one learner:

- Every worker sees the whole batch and computes every batch statistic (rewards, GAE,
  whitening, group baselines, metrics) on all of it, identically.
- The passes over the models are split: rows are cut into rounds of `micro_batch_size x N`,
  and worker r takes rows r, r + N, ... of each round (`Shards.rows`). Every worker makes the
  same number of passes, because each pass gathers the layers from all of them: a worker
  whose share of a round is empty runs that round's first row and throws the result away.
- The no-grad passes write their rows into zeros and are summed over the workers (exact:
  x + 0 = x). The loss of each micro-batch is a token sum over the global minibatch's count,
  as with one worker, so gradients are *summed* over the workers (FSDP's default would
  average them).
- The gradient norm, the loss and the non-finite check are global, so all workers skip an
  update together or step together.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

TIMEOUT = datetime.timedelta(minutes=10)
"""A collective that has not completed in this long fails: a worker that hangs ends the run
instead of stalling it (a dead one is seen at once: its connections close)."""


@dataclass(frozen=True)
class Rank:
    """A worker's place in the process group of a sharded learner."""

    rank: int
    world: int
    address: str
    """tcp://host:port where rank 0 listens for the others."""


def rendezvous_address() -> str:
    """A tcp:// address on this node, with a port that is free now, for rank 0 to listen on."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


class Shards:
    """This worker's part of the learner: which rows it passes, and the sums over workers.
    With one worker (no group) every method is the identity, so the learner has one code path."""

    def __init__(self, place: Rank | None, device: torch.device):
        self.rank, self.world = (place.rank, place.world) if place else (0, 1)
        self.device = device
        self.mesh = None
        # The collectives of a checkpoint written in the background go over a gloo group of
        # their own: on the training's group they could interleave with the training's.
        self.checkpoint_group = None
        if place is not None and place.world > 1:
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh

            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                init_method=place.address,
                rank=place.rank,
                world_size=place.world,
                timeout=TIMEOUT,
            )
            self.mesh = init_device_mesh(device.type, (place.world,))
            self.checkpoint_group = dist.new_group(backend="gloo", timeout=TIMEOUT)

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def rows(self, rows: torch.Tensor, micro_batch_size: int) -> Iterator[tuple[torch.Tensor, bool]]:
        """This worker's micro-batches of `rows` (`share_rows`)."""
        return share_rows(rows, micro_batch_size, self.rank, self.world)

    def sum_(self, *tensors: torch.Tensor | None) -> None:
        """Sum each tensor over the workers, in place (None is skipped)."""
        if self.sharded:
            import torch.distributed as dist

            for t in tensors:
                if t is not None:
                    dist.all_reduce(t)

    def sum_floats(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """{key: scalar} summed over the workers (one collective), as floats."""
        keys = sorted(values)
        if not keys:
            return {}
        stacked = torch.stack([values[k].float() for k in keys])
        self.sum_(stacked)
        return dict(zip(keys, stacked.tolist(), strict=True))

    def shard(self, model: torch.nn.Module, param_dtype: str | None, reduce_dtype: str | None) -> None:
        """FSDP2 over the group: each decoder layer is one unit (gathered for its pass, freed
        after), and so are the input embeddings and an untied LM head, which with a large
        vocabulary are the largest tensors of the model; the root holds the rest (final norm,
        a score head, a tied LM head). The root stays gathered from the forward to the end
        of the backward: it is kept small."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        from cluster.shared.precision import torch_dtype

        policy = MixedPrecisionPolicy(
            param_dtype=torch_dtype(param_dtype) if param_dtype else None,
            reduce_dtype=torch_dtype(reduce_dtype) if reduce_dtype else None,
        )
        for unit in sharding_units(model):
            fully_shard(unit, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Losses are normalised by the global minibatch: gradients add up over the
                # workers. Plain SUM reductions, which gloo also has.
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)

    def release(self, model: torch.nn.Module) -> None:
        """Free the gathered parameters FSDP keeps after a forward pass with no backward
        (the root's: embeddings, heads, final norm), so each worker holds only its shards."""
        if self.sharded:
            model.reshard()

    def full_parameters(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole tensor) of each parameter, gathered one at a time, so no worker holds
        a second copy of the whole model. Every worker must run through it."""
        for name, param in model.named_parameters():
            yield name, full(param.detach())

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any worker (a collective)."""
        if not self.sharded:
            return flag
        count = torch.tensor([float(flag)], device=self.device)
        self.sum_(count)
        return bool(count.item() > 0)

    def barrier(self) -> None:
        if self.sharded:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every worker."""
        if not self.sharded:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def share_rows(rows: torch.Tensor, micro_batch_size: int, rank: int, world: int) -> Iterator[tuple[torch.Tensor, bool]]:
    """Worker `rank`'s micro-batches of `rows`: rows r, r + world, ... of each round of
    micro_batch_size x world rows. Each comes with whether it is a stand-in: a pass made only
    so that every worker makes as many as the others (the round's first row; its result is
    not used)."""
    for round_ in rows.split(micro_batch_size * world):
        mine = round_[rank::world]
        yield (mine, False) if len(mine) else (round_[:1], True)


def full(tensor: Any) -> Any:
    """The whole tensor of a sharded one (a collective: every worker calls it); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharding_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP2 gathers one at a time: each decoder layer, the input embeddings and
    an LM head that is not the embeddings' own weight (a tied one must stay with them, in
    the root)."""
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is embeddings.weight
    return [*decoder_layers(model), *([] if tied else [embeddings]), *([head] if head is not None and not tied else [])]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated blocks of a transformers model: the longest ModuleList in it."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no list of layers to shard")
    return max(lists, key=len)
