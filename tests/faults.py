"""Rewards the fault-injection tests steer from outside the cluster.

While the file named by TAME_TEST_POISON exists, every reward is 1e300: a finite Python
float that passes the reward service's checks and overflows to Inf in the learner's float32,
as an exploding reward model would. `slow_gold` takes a second per item: a request that is
still in flight when its replica is told to stop. `held_gold` scores at a known pace, and not
at all while the file named by TAME_TEST_HOLD exists: a replica that holds its calls without
an answer, as one on a dead node does.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cluster.demo.world import gold_reward


def gold_unless_poisoned(prompt: str, response: str) -> float:
    switch = os.environ.get("TAME_TEST_POISON")
    if switch and Path(switch).exists():
        return 1e300
    return gold_reward(prompt, response)


def slow_gold(prompt: str, response: str) -> float:
    time.sleep(1.0)
    return gold_reward(prompt, response)


HELD_PACE_S = 0.5
"""Seconds `held_gold` takes per item."""


def held_gold(prompt: str, response: str) -> float:
    hold = Path(os.environ["TAME_TEST_HOLD"])
    while hold.exists():
        time.sleep(0.05)
    time.sleep(HELD_PACE_S)
    return gold_reward(prompt, response)


def unscorable(prompt: str, response: str) -> float:
    raise ValueError("no reward for this item")
