"""The one way tame's processes join Ray: the cluster a config or RAY_ADDRESS names, else a
local one on this machine."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_started_here = False


def started_here() -> bool:
    """Whether this process started the Ray it is connected to: everything on it, Serve
    included, stops when the process exits."""
    import ray

    return _started_here and ray.is_initialized()


def starts_local(address: str | None) -> bool:
    """Whether `connect_ray(address, ...)` would start a local Ray: no address given or in
    RAY_ADDRESS, and not connected yet."""
    import ray

    return not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def connect_ray(
    address: str | None, num_cpus: int | None = None, log: Callable[[str], None] | None = None, **options: Any
) -> None:
    """Connect to the Ray cluster at `address` (else RAY_ADDRESS), or start a local one with
    `num_cpus` (all cores when None; `started_here()` says so afterwards). `options` go to
    `ray.init`. Nothing happens when already connected."""
    import ray

    global _started_here
    if ray.is_initialized():
        return
    _started_here = starts_local(address)
    if not _started_here:
        address = address or os.environ["RAY_ADDRESS"]
        if log:
            log(f"connecting to the Ray cluster at {address}")
        ray.init(address=address, **options)
        return
    if log:
        log(f"starting a local Ray with {num_cpus or 'all the'} CPUs")
    # "local": a new Ray of its own, even when another was started on this machine with `ray
    # start` (which a bare ray.init() would join, and refuse num_cpus for).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **options)  # None: Ray counts them
