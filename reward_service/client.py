"""In-cluster access to the reward service: a picklable callable around a deployment handle.

Rollout actors receive a `RewardClient` as their `scorer` and call it with texts; it goes
through the Serve handle (no HTTP inside the cluster), retries a failed call a bounded
number of times within one time budget, and raises `RewardError` when both are spent, so
the caller can hand the prompts back instead of scoring them as 0.

The budget grows with the batch a call carries (`time_budget_s`): right after a new policy
version every actor sends its batch at once, and a call then waits for the others' items as
well as its own. A budget sized for small calls would cancel healthy large ones and send
them again, adding to the very load that made them slow.
"""

from __future__ import annotations

import time

from ray.serve.handle import DeploymentHandle

from cluster.shared.records import Scores
from reward_service.rewards import UnscorableItemError


class RewardError(RuntimeError):
    """The reward service did not answer within the retries and time budget."""


def time_budget_s(timeout_s: float, retries: int, n_items: int, call_items_per_s: float | None) -> float:
    """Seconds one scoring call of `n_items` may take, retries included (`reward.timeout_s`,
    `reward.retries`, `reward.call_items_per_s`).

    `timeout_s` covers what every call costs whatever its size (routing, a replica's queue,
    the batch wait); `(retries + 1) * n_items / call_items_per_s` is added on top, so that
    when each attempt takes an equal share of what is left (`attempt_timeout_s`) every one of
    them can hold the batch: the first gets `timeout_s / (retries + 1) + n_items /
    call_items_per_s`. `call_items_per_s` None adds nothing.
    """
    per_attempt_s = n_items / call_items_per_s if call_items_per_s else 0.0
    return timeout_s + (retries + 1) * per_attempt_s


def attempt_timeout_s(remaining_s: float, attempt: int, retries: int) -> float:
    """How long attempt `attempt` (0-based) waits: an equal share of the budget left over the
    attempts left, so one stuck on a dead replica gives up in time for a retry to reach a
    live one, and one that failed fast leaves its share to the others."""
    return remaining_s / (retries + 1 - attempt)


class RewardClient:
    """`client(prompts, responses) -> scores` through a reward deployment's handle.

    `call_items_per_s` (`reward.call_items_per_s`) lets the time budget grow with the batch
    (`time_budget_s`); None keeps it at `timeout_s` whatever the batch. `with_spread` answers
    a `Scores` record instead of the list: the rewards with the spread of the reward models'
    scores (`Rollout.reward_std`), as the rollout actors ask for.
    """

    def __init__(
        self,
        handle: DeploymentHandle,
        timeout_s: float,
        retries: int,
        call_items_per_s: float | None = None,
        with_spread: bool = False,
    ):
        if timeout_s <= 0 or retries < 0 or (call_items_per_s is not None and call_items_per_s <= 0):
            raise ValueError(
                f"timeout_s and call_items_per_s must be > 0 and retries >= 0 "
                f"(got {timeout_s}, {call_items_per_s}, {retries})"
            )
        self.handle = handle
        self.timeout_s = timeout_s
        self.retries = retries
        self.call_items_per_s = call_items_per_s
        self.with_spread = with_spread

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float] | Scores:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return Scores([], []) if self.with_spread else []
        budget_s = time_budget_s(self.timeout_s, self.retries, len(prompts), self.call_items_per_s)
        deadline = time.monotonic() + budget_s
        failures: list[str] = []
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            method = self.handle.score_items if self.with_spread else self.handle.score
            response = method.remote(list(prompts), list(responses))
            try:
                scores = response.result(timeout_s=attempt_timeout_s(remaining, attempt, self.retries))
            except UnscorableItemError as e:  # the same items would fail again: no retry
                raise RewardError(f"the reward service cannot score these items: {_message(e)}") from e
            except Exception as e:  # replica died, timed out, back-pressure: retryable
                response.cancel()
                failures.append(f"attempt {attempt + 1}: {type(e).__name__}: {_message(e)[:200]}")
                # Back off a little (never past the deadline) so a restarting replica can come up.
                time.sleep(max(0.0, min(0.1 * 2**attempt, deadline - time.monotonic())))
                continue
            rewards = scores.rewards if self.with_spread else scores
            if len(rewards) != len(prompts):
                raise RewardError(f"the reward service answered {len(rewards)} scores for {len(prompts)} items")
            return scores if self.with_spread else [float(s) for s in scores]
        raise RewardError(
            f"no reward after {len(failures)} attempt(s) within {budget_s:.1f}s: "
            + "; ".join(failures or ["time budget spent"])
        )


def _message(e: Exception) -> str:
    """An error's own message: a Ray task error's is its cause's, without the remote traceback."""
    return str(getattr(e, "cause", None) or e)
