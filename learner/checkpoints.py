"""Checkpoints of a run: `<run_dir>/checkpoints/version-NNNNNN/` holds `policy/` and (with
GAE) `critic/` in Hugging Face format (loadable with `from_pretrained` and by vLLM) and
`trainer_state.pt` (optimizers, schedulers, KL controller, RNG states, the driver's state).
Each is written to a hidden temporary folder and renamed into place, so a reader never
sees half of one, and an interrupted save is never picked up."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.shared.files import atomic_directory

NAME = re.compile(r"^version-(\d{6,})$")
STATE_FILE = "trainer_state.pt"


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


def save(final: Path, models: dict[str, Any], tokenizer: Any, state: dict, keep: int) -> str:
    """Write the models (Hugging Face folders, with the tokenizer and the policy's generation
    config) and the trainer state atomically, then keep the newest `keep` checkpoints."""
    with atomic_directory(final) as tmp:
        for name, model in models.items():
            model.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
            generation_config = getattr(model, "generation_config", None)
            if generation_config is not None and name == "policy":
                generation_config.save_pretrained(tmp / name)
        torch.save(state, tmp / STATE_FILE)
    for old in complete(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return str(final)


def load(path: Path, models: dict[str, tuple[Any, Any]], dtype: torch.dtype, device: torch.device) -> dict:
    """Load each model's weights ({name: (model, its Auto class)}) in place and return the
    trainer state."""
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE})")
    for name, (model, auto_class) in models.items():
        model.load_state_dict(auto_class.from_pretrained(path / name, dtype=dtype).state_dict())
    # Our own file, holding numpy and python RNG states that weights_only cannot load.
    return torch.load(path / STATE_FILE, map_location=device, weights_only=False)


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
