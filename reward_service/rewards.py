"""The reward of a (prompt, response) pair: a weighted sum of a reward model and rule functions.

    reward = model_weight * reward_model(prompt, response) + sum_i weight_i * f_i(prompt, response)

Verifiable tasks need no model (`model.reward: null`): the sum is then over the rule
functions alone. Rule functions are named in the config as `module:function` and take
(prompt: str, response: str) -> float. The sum is computed inside the Serve deployment, so
every caller (deployment handle or HTTP) gets the same figure. No Ray here.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cluster.shared.config import RewardFunctionConfig, TameConfig
from cluster.shared.errors import ConfigError
from cluster.shared.tokens import require_chat_template
from reward_service.model import RewardModel

RuleFunction = Callable[[str, str], float]


@dataclass(frozen=True)
class WeightedFunction:
    name: str
    """`module:function` as written in the config."""
    function: RuleFunction
    weight: float


def resolve_function(spec: str, where: str) -> RuleFunction:
    """Import `module:function`; a ConfigError names `where` (the config key) and the cause."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: {spec!r} is not of the form module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an import runs arbitrary code: any failure is the config's problem
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from None
    function = getattr(module, attr, None)
    if function is None:
        raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}")
    if not callable(function):
        raise ConfigError(f"{where}: {spec!r} is not callable")
    return function


def load_functions(functions: list[RewardFunctionConfig]) -> list[WeightedFunction]:
    return [
        WeightedFunction(f.function, resolve_function(f.function, f"reward.functions[{i}].function"), f.weight)
        for i, f in enumerate(functions)
    ]


def check_reward_config(cfg: TameConfig) -> None:
    """Fail at start-up, with the config key, on what would otherwise fail inside a replica:
    a model folder that is not there, a tokenizer without the chat template the config asks
    for (every request would fail), a function that does not import. (That there is
    something to score with is the config's own check.)"""
    if cfg.model.reward is not None and not (Path(cfg.model.reward) / "config.json").is_file():
        raise ConfigError(f"model.reward: {cfg.model.reward} is not a Hugging Face model folder (no config.json)")
    if cfg.model.reward is not None and cfg.data.chat_template:
        require_chat_template(cfg.model.reward, "model.reward")
    load_functions(cfg.reward.functions)


class UnscorableItemError(ValueError):
    """A rule function could not score an item (it raised, or returned no finite number).

    A client error: the item is outside what the function handles (e.g. a prompt the
    task's judge does not know). HTTP answers 422 with the message; the handle raises it
    and `RewardClient` does not retry it.
    """


@dataclass
class RewardSum:
    """`model_weight * model + sum_i w_i * f_i`, over a batch of (prompt, response) pairs."""

    model: RewardModel | None
    model_weight: float = 1.0
    functions: list[WeightedFunction] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: TameConfig, device: str = "cpu") -> RewardSum:
        check_reward_config(cfg)
        model = None
        if cfg.model.reward is not None:
            model = RewardModel.load(
                cfg.model.reward,
                chat_template=cfg.data.chat_template,
                max_length=cfg.reward.max_length,
                dtype=cfg.model.dtype,
                device=device,
            )
        return cls(model, cfg.reward.model_weight, load_functions(cfg.reward.functions))

    def score_each(self, prompts: list[str], responses: list[str]) -> list[float | UnscorableItemError]:
        """The reward of every item, or the error that kept one item from being scored.

        Errors are returned per item, not raised, so that one bad item cannot fail the
        other items it was batched with (which may belong to other callers).
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        totals: list[float | UnscorableItemError] = [0.0] * len(prompts)
        if self.model is not None:
            totals = [self.model_weight * s for s in self.model.score(prompts, responses)]
        for wf in self.functions:
            for i, (p, r) in enumerate(zip(prompts, responses)):
                if isinstance(totals[i], UnscorableItemError):
                    continue
                try:
                    value = wf.function(p, r)
                except Exception as e:  # the function's verdict on this input, not a server fault
                    totals[i] = UnscorableItemError(f"reward function {wf.name} failed: {type(e).__name__}: {e}")
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    totals[i] = UnscorableItemError(
                        f"reward function {wf.name} returned {value!r}, not a finite number"
                    )
                    continue
                totals[i] += wf.weight * float(value)
        return totals

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The rewards of all items; raises UnscorableItemError naming the first bad item."""
        scores = self.score_each(prompts, responses)
        for i, s in enumerate(scores):
            if isinstance(s, UnscorableItemError):
                raise UnscorableItemError(f"item {i}: {s}")
        return scores
