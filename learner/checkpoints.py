"""Checkpoints of a run: `<run_dir>/checkpoints/version-NNNNNN/` holds
- `policy/` and (with GAE) `critic/` in Hugging Face format, loadable with `from_pretrained`
  and by vLLM (the export for users: whole tensors, in the dtype of the checkpoint each model
  started from, which its config.json names; the learner's float32 master weights are in
  `sharded/`). A LoRA policy's `policy/` is a peft adapter folder (`PeftModel.from_pretrained`
  on the base); `tame export` merges it into the base;
- `sharded/`: the trained weights (not a LoRA policy's frozen base) and optimizer states as
  the learner holds them, written by every worker in parallel with
  `torch.distributed.checkpoint`, which reshards on load: a run saved with N learner workers
  resumes with any number;
- `trainer_state.pt`, written last: schedulers, KL controller, RNG states, the driver's state.
Each is written to a hidden temporary folder and renamed into place, so a reader never
sees half of one, and an interrupted save is never picked up.

A save has two halves (`Writer`). Staging, while the learner waits: the weights and optimizer
states are copied to host memory, the export is gathered to rank 0's host in its dtype, the
trainer state is serialised. Writing: the files, then the rename and the pruning of older
checkpoints. In the background (`learner.async_checkpoints`) the learner trains on while a
thread writes; the next save, a load and the end of the run wait for it (`Writer.wait`)."""

from __future__ import annotations

import contextlib
import copy
import io
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.shared.files import move_into_place, remove_directory, temporary_sibling
from cluster.shared.score_head import SCORE_BIAS_KEY
from learner.lora import is_lora
from learner.sharding import Shards, full

NAME = re.compile(r"^version-(\d{6,})$")
STATE_FILE = "trainer_state.pt"
SHARDED = "sharded"
SINGLE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"
"""What torch.distributed.checkpoint warns when it saves or loads without a process group."""


def path_of(run_dir: Path, version: int) -> Path:
    return run_dir / "checkpoints" / f"version-{version:06d}"


def complete(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in folder.iterdir() if (m := NAME.match(d.name)) and (d / STATE_FILE).is_file()]
    return [d for _, d in sorted(found)]


def _sharded_state(models: dict[str, Any], optimizers: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """{name: state dict} of the models and of the optimizers ({name: (model, optimizer)}),
    keyed by parameter name, each worker's shards as DTensors when sharded."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {
        **{name: get_model_state_dict(model, options=_trained()) for name, model in models.items()},
        **{
            name: get_optimizer_state_dict(model, optimizer, options=_trained())
            for name, (model, optimizer) in optimizers.items()
        },
    }


def _adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of a peft model's adapter (float32, a few MB), as `save_pretrained` takes it."""
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items() if "lora_" in name}


def _trained(model: torch.nn.Module | None = None):
    """State-dict options for the trained weights only. A LoRA policy's frozen base is its
    starting checkpoint's, which a resumed run reloads: only the adapter is saved, and loading
    sets the adapter alone (dcp.load has checked that every one of its tensors was found)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = model is not None and any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=not frozen)


@contextlib.contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """One learner worker saves and loads without a process group, on purpose: torch's
    warning that it assumes so would be noise in the log of every checkpoint."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS)
        yield


class SaveFailedElsewhereError(RuntimeError):
    """Another worker of the learner failed to write its part of a checkpoint."""


class Writer:
    """Writes one learner worker's checkpoints: every worker of the learner has one and calls
    it together with the others. With `background`, `save` returns once the checkpoint is
    staged, and a thread writes it; otherwise it returns once it is in place."""

    def __init__(self, shards: Shards, background: bool):
        self.shards = shards
        self.background = background
        self.lead = shards.rank == 0
        self.pending: Future | None = None  # the save being written in the background
        self.written: str | None = None  # the newest checkpoint saved, once in place
        self._skeletons: dict[str, torch.nn.Module] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if background else None
        if background and not shards.sharded:
            # The background save warns from a thread, where no catch_warnings of ours reaches.
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS)

    def save(
        self,
        final: Path,
        models: dict[str, Any],
        optimizers: dict[str, tuple[Any, Any]],
        tokenizer: Any,
        state: dict,
        keep: int,
        dtypes: dict[str, torch.dtype],
    ) -> str:
        """Save a checkpoint to `final` and keep the newest `keep`: {name: model} exported in
        `dtypes[name]`, their optimizers ({name: (model, optimizer)}; those that have not
        stepped yet have no state to save), and the trainer `state`. The previous save is
        waited for first (`wait`). Returns `final`, where the checkpoint is (background: will
        be) once complete."""
        self.wait()
        stepped = {name: pair for name, pair in optimizers.items() if pair[1].state}
        tmp = Path(self.shards.broadcast(str(temporary_sibling(final)) if self.lead else None))
        try:
            # Staging, in the calling thread: the export's gathers are collectives of the
            # training's group, which a background thread must not make.
            exports = {
                name: _adapter(model) if is_lora(model) else self._whole(model, dtypes[name])
                for name, model in models.items()
            }
            skeletons = (
                {
                    # A peft model saves its adapter folder itself, from the state dict it is given.
                    name: model if is_lora(model) else self._skeleton(name, model, dtypes[name])
                    for name, model in models.items()
                }
                if self.lead
                else {}
            )
            trainer_state = io.BytesIO()
            if self.lead:
                torch.save({**state, "optimizers": sorted(stepped)}, trainer_state)
            shards_written = self._start_shards(_sharded_state(models, stepped), tmp / SHARDED)
        except BaseException:
            if self.lead:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

        def write() -> str:
            return self._write(
                tmp, final, exports, skeletons, tokenizer, shards_written, trainer_state.getvalue(), keep
            )

        if self.background:
            self.pending = self._thread.submit(write)
        else:
            write()
            self.shards.barrier()  # the folder is in place before any worker returns
        return str(final)

    def wait(self) -> str | None:
        """Wait until the save in progress is written; raise on every worker if it failed on
        any (so they stay in step). Returns the newest checkpoint saved, None before any."""
        if not self.background:
            return self.written
        error = None
        if self.pending is not None:
            try:
                self.pending.result()
            except Exception as e:
                error = e
            finally:
                self.pending = None
        if self.shards.any(error is not None):
            if error is not None:
                raise error
            raise SaveFailedElsewhereError(
                "another worker of the learner failed to write its part of the "
                "checkpoint saved last (its error is in that worker's log)"
            )
        return self.written

    # ------------------------------------------------------------------ staging

    def _whole(self, model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """The model's tensors, whole and in `dtype`, in rank 0's host memory (None on the other
        workers): gathered one at a time and cast as each arrives, so rank 0 holds the export
        in its dtype and nothing more. Tied names share one tensor (written once)."""
        out: dict[str, torch.Tensor] = {}
        seen: dict[int, torch.Tensor | None] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                whole = full(tensor.detach())
                seen[id(tensor)] = (
                    None
                    if not self.lead
                    else whole.to(
                        "cpu",
                        dtype if whole.is_floating_point() else whole.dtype,
                        # One worker's tensors are the model's own: a background write needs a copy.
                        copy=self.background and not self.shards.sharded,
                    )
                )
                del whole
            if self.lead:
                out[name] = seen[id(tensor)]
        return out if self.lead else None

    def _start_shards(self, state: dict[str, Any], folder: Path) -> Callable[[], Any]:
        """Begin writing this worker's shards of `state` to `folder`; returns a function that
        returns once they are on disk (on rank 0: once every worker's are). In the background,
        async_save copies the state to host memory now and writes the copy from a thread of its
        own, with its collectives on a group that is not the training's; otherwise the function
        writes them."""
        import torch.distributed.checkpoint as dcp

        no_dist = not self.shards.sharded
        if self.background:
            return dcp.async_save(
                state, checkpoint_id=folder, process_group=self.shards.checkpoint_group, no_dist=no_dist
            ).result

        def write() -> None:
            with _single_process_is_meant():
                dcp.save(state, checkpoint_id=folder, no_dist=no_dist)

        return write

    def _skeleton(self, name: str, model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        """`model`'s class and config, in `dtype`, on the meta device (built once): what the
        export is saved with. transformers writes the config, the generation config, the dtype
        and the tied weights from the model it saves, and this one holds no memory and is not
        the model that trains on while a background thread writes."""
        held = self._skeletons.get(name)
        if held is None:
            from torch.distributed.fsdp import FSDPModule
            from transformers import PreTrainedModel

            cls = next(
                c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule)
            )
            with torch.device("meta"):
                held = cls._from_config(copy.deepcopy(model.config), dtype=dtype)
            if getattr(model, "generation_config", None) is not None:
                held.generation_config = copy.deepcopy(model.generation_config)
            self._skeletons[name] = held
        return held

    # ------------------------------------------------------------------ writing

    def _write(
        self,
        tmp: Path,
        final: Path,
        exports: dict[str, dict | None],
        skeletons: dict[str, Any],
        tokenizer: Any,
        shards_written: Callable[[], Any],
        trainer_state: bytes,
        keep: int,
    ) -> str:
        """Write the staged checkpoint and put it in place: rank 0 writes the export while every
        worker's shards are written (`_start_shards`), then, once they are all on disk, the
        trainer state, last, and renames the folder into place."""
        try:
            try:
                if self.lead:
                    for name in list(exports):
                        skeletons[name].save_pretrained(tmp / name, state_dict=exports.pop(name))
                        tokenizer.save_pretrained(tmp / name)
            finally:
                # Even after a failed export: the workers' collectives stay paired, and nothing
                # writes into the folder once it is removed.
                shards_written()
            if self.lead:
                (tmp / STATE_FILE).write_bytes(trainer_state)
                move_into_place(tmp, final)
                for old in complete(final.parent.parent)[:-keep]:
                    remove_directory(old)
        finally:
            if self.lead and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.written = str(final)
        return self.written


def load(
    path: Path, models: dict[str, tuple[Any, Any]], optimizers: dict[str, tuple[Any, Any]], shards: Shards
) -> dict:
    """Load the weights and optimizer states in place ({name: (model, Auto class)} and
    {name: (model, optimizer)}) and return the trainer state. Every worker calls it."""
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE})")
    # Our own file, holding numpy and python RNG states that weights_only cannot load.
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if not (path / SHARDED).is_dir():
        return _load_whole(path, models, optimizers, state, shards)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    # A GAE checkpoint may be resumed by a critic-free estimator: its critic is not loaded.
    stepped = {name: optimizers[name] for name in state["optimizers"] if name in optimizers}
    loaded = _sharded_state({name: model for name, (model, _) in models.items()}, stepped)
    saved = dcp.FileSystemReader(path / SHARDED).read_metadata().state_dict_metadata
    unbiased = [name for name in models if SCORE_BIAS_KEY in loaded[name] and f"{name}.{SCORE_BIAS_KEY}" not in saved]
    with _single_process_is_meant():  # a bias the checkpoint lacks (and its optimizer state) is not loaded
        dcp.load(
            loaded,
            checkpoint_id=path / SHARDED,
            no_dist=not shards.sharded,
            planner=dcp.DefaultLoadPlanner(allow_partial_load=bool(unbiased)),
        )
    for name, (model, _) in models.items():
        set_model_state_dict(model, loaded[name], options=_trained(model))
    _zero_missing_score_bias([models[name][0] for name in unbiased])
    for name, (model, optimizer) in stepped.items():
        set_optimizer_state_dict(model, optimizer, loaded[name], options=_trained(model))
    return state


def _load_whole(
    path: Path, models: dict[str, tuple[Any, Any]], optimizers: dict[str, tuple[Any, Any]], state: dict, shards: Shards
) -> dict:
    """A checkpoint written before `sharded/` existed: Hugging Face weights and whole
    optimizer states in the trainer state. One worker only."""
    if shards.sharded:
        raise ValueError(
            f"{path} was written by a tame without sharded checkpoints: resume it with learner.num_workers 1"
        )
    unbiased = []
    for name, (model, auto_class) in models.items():
        missing, unexpected = model.load_state_dict(
            auto_class.from_pretrained(path / name, dtype=torch.float32).state_dict(), strict=False
        )
        if unexpected or set(missing) - {SCORE_BIAS_KEY}:
            raise ValueError(
                f"{path / name}: the weights do not fit the {name} "
                f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
            )
        if missing:
            unbiased.append(model)
    _zero_missing_score_bias(unbiased)
    for name, (model, optimizer) in optimizers.items():
        if name not in state:
            continue
        if not any(model is m for m in unbiased):
            optimizer.load_state_dict(state[name])
            continue
        # Its saved state knows every parameter but the bias, the critic's last: load without it.
        params = optimizer.param_groups[-1]["params"]
        bias = params.pop()
        assert bias is model.score.bias, "the score bias is the critic's last parameter"
        optimizer.load_state_dict(state[name])
        optimizer.param_groups[-1]["params"].append(bias)
    return state


def _zero_missing_score_bias(models: list[Any]) -> None:
    """A critic saved before critics kept the reward model's score bias computed without one:
    it resumes with a bias of 0, as it was trained."""
    with torch.no_grad():
        for model in models:
            model.score.bias.zero_()


def trainer_state(learner: Any, driver_state: dict) -> dict:
    """What a checkpoint of `learner` (a `Learner`) carries besides weights and optimizer
    states: the version, the schedules, the KL controller, the ptx cursor, the non-finite
    counts, every random state an update draws from, and the driver's state (`extra`)."""
    return {
        "version": learner._version,
        **{f"{name}_scheduler": scheduler.state_dict() for name, scheduler in learner.schedulers.items()},
        "kl_controller": learner.kl_controller.state_dict(),
        "ptx_cursor": learner.ptx_cursor,
        "nonfinite": {"in_row": learner.nonfinite_in_row, "total": learner.nonfinite_total},
        "rng": rng_states(learner.shuffle, learner.device),
        "extra": driver_state,
    }


def restore_trainer_state(learner: Any, state: dict) -> None:
    """Put `trainer_state`'s figures back into `learner`."""
    learner._version = state["version"]
    for name, scheduler in learner.schedulers.items():
        scheduler.load_state_dict(state[f"{name}_scheduler"])
    learner.kl_controller.load_state_dict(state["kl_controller"])
    learner.ptx_cursor = state["ptx_cursor"]
    learner.nonfinite_in_row = state["nonfinite"]["in_row"]
    learner.nonfinite_total = state["nonfinite"]["total"]
    restore_rng_states(state["rng"], learner.shuffle, learner.device)


def rng_states(generator: torch.Generator, device: torch.device) -> dict:
    """Every random state an update draws from: python, numpy, torch (and CUDA), and the
    learner's shuffle generator."""
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "shuffle": generator.get_state(),
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng_states(rng: dict, generator: torch.Generator, device: torch.device) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"].cpu())
    generator.set_state(rng["shuffle"].cpu())
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
