"""In-cluster access to the reward service: a picklable callable around a deployment handle.

Rollout actors receive a `RewardClient` as their `scorer` and call it with texts; it goes
through the Serve handle (no HTTP inside the cluster), retries a failed call a bounded
number of times within one time budget, and raises `RewardError` when both are spent, so
the caller can hand the prompts back instead of scoring them as 0.
"""

from __future__ import annotations

import time

from ray.serve.handle import DeploymentHandle

from reward_service.rewards import UnscorableItemError


class RewardError(RuntimeError):
    """The reward service did not answer within the retries and time budget."""


class RewardClient:
    """`client(prompts, responses) -> scores` through a reward deployment's handle."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float, retries: int):
        if timeout_s <= 0 or retries < 0:
            raise ValueError(f"timeout_s must be > 0 and retries >= 0 (got {timeout_s}, {retries})")
        self.handle = handle
        self.timeout_s = timeout_s
        self.retries = retries

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        deadline = time.monotonic() + self.timeout_s
        failures: list[str] = []
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            response = self.handle.score.remote(list(prompts), list(responses))
            try:
                # An equal share of what is left per attempt: a call stuck on a dead replica
                # gives up in time for a retry to reach a live one.
                scores = response.result(timeout_s=remaining / (self.retries + 1 - attempt))
            except UnscorableItemError as e:  # the same items would fail again: no retry
                raise RewardError(f"the reward service cannot score these items: {_message(e)}") from e
            except Exception as e:  # replica died, timed out, back-pressure: retryable
                response.cancel()
                failures.append(f"attempt {attempt + 1}: {type(e).__name__}: {_message(e)[:200]}")
                # Back off a little (never past the deadline) so a restarting replica can come up.
                time.sleep(max(0.0, min(0.1 * 2 ** attempt, deadline - time.monotonic())))
                continue
            if len(scores) != len(prompts):
                raise RewardError(f"the reward service answered {len(scores)} scores for {len(prompts)} items")
            return [float(s) for s in scores]
        raise RewardError(f"no reward after {len(failures)} attempt(s) within {self.timeout_s:.1f}s: "
                          + "; ".join(failures or ["time budget spent"]))


def _message(e: Exception) -> str:
    """An error's own message: a Ray task error's is its cause's, without the remote traceback."""
    return str(getattr(e, "cause", None) or e)
