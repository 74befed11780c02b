"""How many torch threads a process computes with."""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_torch_threads(n: float | int) -> int:
    """Use `n` intra-op threads (at least 1, at most the cores available); returns it.

    Ray also sets the thread count of an actor from its num_cpus; setting it here makes the
    same true outside Ray, so the roles do not fight over the cores.
    """
    threads = max(1, min(int(n), available_cores()))
    torch.set_num_threads(threads)
    return threads
