"""Checkpoints of a run: `<run_dir>/checkpoints/version-NNNNNN/` holds
- `policy/` and (with GAE) `critic/` in Hugging Face format, loadable with `from_pretrained`
  and by vLLM (the export for users: whole tensors, float32);
- `sharded/`: the weights and optimizer states as the learner holds them, written by every
  worker in parallel with `torch.distributed.checkpoint`, which reshards on load: a run saved
  with N learner workers resumes with any number;
- `trainer_state.pt`, written last: schedulers, KL controller, RNG states, the driver's state.
Each is written to a hidden temporary folder and renamed into place, so a reader never
sees half of one, and an interrupted save is never picked up."""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.shared.files import atomic_directory
from cluster.shared.score_head import SCORE_BIAS_KEY
from learner.sharding import Shards

NAME = re.compile(r"^version-(\d{6,})$")
STATE_FILE = "trainer_state.pt"
SHARDED = "sharded"


def path_of(run_dir: Path, version: int) -> Path:
    return run_dir / "checkpoints" / f"version-{version:06d}"


def complete(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in folder.iterdir()
             if (m := NAME.match(d.name)) and (d / STATE_FILE).is_file()]
    return [d for _, d in sorted(found)]


def _sharded_state(models: dict[str, Any], optimizers: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """{name: state dict} of the models and of the optimizers ({name: (model, optimizer)}),
    keyed by parameter name, each worker's shards as DTensors when sharded."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {**{name: get_model_state_dict(model) for name, model in models.items()},
            **{name: get_optimizer_state_dict(model, optimizer) for name, (model, optimizer) in optimizers.items()}}


@contextlib.contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """One learner worker saves and loads without a process group, on purpose: torch's
    warning that it assumes so would be noise in the log of every checkpoint."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save(final: Path, models: dict[str, Any], optimizers: dict[str, tuple[Any, Any]], tokenizer: Any,
         state: dict, keep: int, shards: Shards) -> str:
    """Write a checkpoint atomically and keep the newest `keep`. Every worker of the learner
    calls it: each writes its shards; rank 0 writes the export and the trainer state and
    renames the folder into place. Optimizers that have not stepped yet have no state to save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    lead = shards.rank == 0
    stepped = {name: pair for name, pair in optimizers.items() if pair[1].state}
    with atomic_directory(final) if lead else contextlib.nullcontext() as tmp:
        tmp = Path(shards.broadcast(str(tmp) if lead else None))
        for name, model in models.items():
            # Sharded, the export is gathered (to rank 0's host); one worker exports its own tensors.
            whole = (get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                     if shards.sharded else None)
            if lead:
                model.save_pretrained(tmp / name, state_dict=whole)
                tokenizer.save_pretrained(tmp / name)
                generation_config = getattr(model, "generation_config", None)
                if generation_config is not None and name == "policy":
                    generation_config.save_pretrained(tmp / name)
            del whole
        with _single_process_is_meant():
            dcp.save(_sharded_state(models, stepped), checkpoint_id=tmp / SHARDED, no_dist=not shards.sharded)
        if lead:
            torch.save({**state, "optimizers": sorted(stepped)}, tmp / STATE_FILE)
    shards.barrier()  # the folder is in place before any worker returns
    if lead:
        for old in complete(final.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return str(final)


def load(path: Path, models: dict[str, tuple[Any, Any]], optimizers: dict[str, tuple[Any, Any]],
         shards: Shards) -> dict:
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
        dcp.load(loaded, checkpoint_id=path / SHARDED, no_dist=not shards.sharded,
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=bool(unbiased)))
    for name, (model, _) in models.items():
        set_model_state_dict(model, loaded[name])
    _zero_missing_score_bias([models[name][0] for name in unbiased])
    for name, (model, optimizer) in stepped.items():
        set_optimizer_state_dict(model, optimizer, loaded[name])
    return state


def _load_whole(path: Path, models: dict[str, tuple[Any, Any]], optimizers: dict[str, tuple[Any, Any]],
                state: dict, shards: Shards) -> dict:
    """A checkpoint written before `sharded/` existed: Hugging Face weights and whole
    optimizer states in the trainer state. One worker only."""
    if shards.sharded:
        raise ValueError(f"{path} was written by a tame without sharded checkpoints: "
                         "resume it with learner.num_workers 1")
    unbiased = []
    for name, (model, auto_class) in models.items():
        missing, unexpected = model.load_state_dict(
            auto_class.from_pretrained(path / name, dtype=torch.float32).state_dict(), strict=False)
        if unexpected or set(missing) - {SCORE_BIAS_KEY}:
            raise ValueError(f"{path / name}: the weights do not fit the {name} "
                             f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
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


def rng_states(generator: torch.Generator, device: torch.device) -> dict:
    """Every random state an update draws from: python, numpy, torch (and CUDA), and the
    learner's shuffle generator."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state(), "shuffle": generator.get_state()}
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
