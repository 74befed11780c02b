"""Waiting for the roles to come up: a deadline, and a word every 10 s on what is pending.

Ray queues an actor it cannot place silently, for as long as it takes, and Serve waits for
its replicas the same way. A run's start therefore waits for each of its roles (the learner,
the first rollout actors, the reward replicas) against one deadline,
`cluster.start_timeout_s`. Every `REPORT_EVERY_S` it says which roles are still pending, what
each asked for and what the cluster has free; past the deadline it fails with a RunError
that says the same.

Most of a role's own start is importing torch, transformers and vLLM: `heavy_imports` makes
that cheaper.
"""

from __future__ import annotations

import atexit
import functools
import gc
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cluster.shared.errors import RunError
from cluster.shared.resources import free_on_cluster

REPORT_EVERY_S = 10.0


@dataclass
class Pending:
    """A role on its way up."""

    name: str
    """"the learner", "rollout actor 0", "the reward service"."""
    ask: str
    """What it asked Ray for, as the config spells it: "learner.num_cpus 1"."""
    is_up: Callable[[], bool]
    """Polled until true; raises when the role failed to start."""
    resources: tuple[str, ...] = ()
    """The resources it asks for, to report what the cluster has free of them."""


@contextmanager
def heavy_imports() -> Iterator[None]:
    """Import torch, transformers or vLLM inside this: Python's cyclic garbage collector is
    off meanwhile, and what the imports made is frozen afterwards (`gc.freeze`).

    The imports make a great many objects that live as long as the process (modules,
    classes, functions), and the collector scans every tracked object each time the heap has
    grown by a quarter, so it scans them again and again during the imports and the engine
    start that follows, and frees none of them: a large share of a role's start (figures in
    benchmarks/README.md, "Measured by hand"). Frozen objects are never scanned again (nor
    freed, which costs nothing for objects that live as long as the process). A block that
    imports nothing new (the libraries were loaded before) freezes nothing, so a process that
    loads models again and again does not keep its garbage."""
    enabled, modules = gc.isenabled(), len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > modules:
            gc.freeze()
            _unfreeze_at_exit()
        if enabled:
            gc.enable()


@functools.cache
def _unfreeze_at_exit() -> None:
    """At exit, hand the frozen objects back to the collector, so that the interpreter frees
    them as it would have: bindings that count what is still alive when they unload (triton's,
    which vLLM imports) would otherwise print a screen of "leaked function" lines."""
    atexit.register(gc.unfreeze)


def ref_done(ref) -> Callable[[], bool]:
    """`is_up` of an actor call: true once the call returned (or failed: its caller sees how)."""
    import ray

    return lambda: bool(ray.wait([ref], timeout=0)[0])


def wait_until_up(
    pending: list[Pending],
    timeout_s: float,
    log: Callable[[str], None],
    what: str = "the run",
    report_every_s: float = REPORT_EVERY_S,
    poll_s: float = 0.25,
) -> None:
    """Return once every role is up; a RunError naming the pending ones after `timeout_s`."""
    start = time.monotonic()
    next_report = start + report_every_s
    while True:
        pending = [p for p in pending if not p.is_up()]
        if not pending:
            return
        now = time.monotonic()
        if now - start >= timeout_s:
            raise RunError(
                f"{what} did not start within cluster.start_timeout_s {timeout_s:g} s: "
                f"{_describe(pending)}. If the cluster adds nodes slowly, raise "
                "cluster.start_timeout_s; otherwise lower what the roles ask for"
            )
        if now >= next_report:
            log(f"still starting after {now - start:.0f} s: {_describe(pending)}")
            next_report += report_every_s
        time.sleep(poll_s)


def _describe(pending: list[Pending]) -> str:
    resources = tuple(dict.fromkeys(r for p in pending for r in p.resources))
    roles = "; ".join(f"{p.name} ({p.ask})" for p in pending)
    return f"waiting for {roles}; {free_on_cluster(resources)}"
