"""The prompt source the controller hands prompts out from, with a cursor that checkpoints
capture.

Exactly-once accounting: every prompt of an epoch leaves the source once; a prompt whose
rollouts are not trained on (its actor died, its score failed, it grew too stale) comes back
through `give_back` and is handed out again before any new prompt.
"""

from __future__ import annotations

import random
from collections import deque

from cluster.shared.records import Prompt


class PromptSource:
    """Hands out prompts epoch by epoch, reshuffled per epoch from (seed, epoch)."""

    def __init__(self, prompts: list[tuple[tuple[str, str], ...]], seed: int, shuffle: bool = True):
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self.returned: deque[str] = deque()
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def prompt(self, prompt_id: str) -> Prompt:
        index = int(prompt_id.split(":")[1])
        return Prompt(prompt_id, self.prompts[index])

    def take(self, n: int) -> list[Prompt]:
        """The next n prompts: given-back ones first, then the epoch's order."""
        out = []
        while len(out) < n and self.returned:
            out.append(self.prompt(self.returned.popleft()))
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            index = self._order[self.position]
            self.position += 1
            out.append(Prompt(f"{self.epoch}:{index}", self.prompts[index]))
        return out

    def give_back(self, prompt_ids) -> None:
        self.returned.extend(prompt_ids)

    def state(self, outstanding: list[str]) -> dict:
        """The cursor for a checkpoint; `outstanding` are prompts handed out but not trained on."""
        return {"epoch": self.epoch, "position": self.position, "returned": list(outstanding) + list(self.returned)}

    def restore(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation(self.epoch)
        self.returned = deque(state["returned"])
