"""The reward of a (prompt, response) pair: a weighted sum of a reward model and rule functions.

    reward = model_weight * reward_model(prompt, response) + sum_i weight_i * f_i(prompt, response)

Verifiable tasks need no model (`model.reward: null`): the sum is then over the rule
functions alone. Rule functions are named in the config as `module:function` and take
(prompt: str, response: str) -> float. The sum is computed inside the Serve deployment, so
every caller (deployment handle or HTTP) gets the same figure. No Ray here.

`model.reward` may be an ensemble folder (`cluster.shared.reward_folder`): every member
scores the batch, and `reward.ensemble.aggregation` (`AGGREGATIONS`) makes one model score
of each item's K member scores (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
Overoptimization"). One reward model is an ensemble of one, whose aggregate is its score.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cluster.shared.config import RewardFunctionConfig, TameConfig
from cluster.shared.errors import ConfigError
from cluster.shared.reward_folder import SINGLE, reward_members
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
    a model folder that is not there (or an ensemble's broken `ensemble.json`, or member), a
    tokenizer without the chat template the config asks for (every request would fail), a
    function that does not import. (That there is something to score with is the config's
    own check.)"""
    if cfg.model.reward is not None:
        for folder in reward_members("model.reward", cfg.model.reward).values():
            if not (folder / "config.json").is_file():
                raise ConfigError(f"model.reward: {folder} is not a Hugging Face model folder (no config.json)")
            if cfg.data.chat_template:
                require_chat_template(folder, "model.reward")
    load_functions(cfg.reward.functions)


# --------------------------------------------------------------------------- aggregation


def population_std(scores: Sequence[float]) -> float:
    """sqrt(mean((s_k - mean)^2)) over the K scores: 0 for one score (or none)."""
    if len(scores) < 2:
        return 0.0
    mean = sum(scores) / len(scores)
    return math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))


def aggregate_mean(scores: Sequence[float], std_coef: float) -> float:
    return sum(scores) / len(scores)


def aggregate_min(scores: Sequence[float], std_coef: float) -> float:
    """The worst case: what the least convinced member says."""
    return min(scores)


def aggregate_mean_minus_std(scores: Sequence[float], std_coef: float) -> float:
    """Uncertainty-weighted: the mean, lowered where the members disagree."""
    return aggregate_mean(scores, std_coef) - std_coef * population_std(scores)


AGGREGATIONS: dict[str, Callable[[Sequence[float], float], float]] = {
    "mean": aggregate_mean,
    "min": aggregate_min,
    "mean_minus_std": aggregate_mean_minus_std,
}
"""`reward.ensemble.aggregation` -> f(member scores (K,) of one item, std_coef) -> its model score."""


# --------------------------------------------------------------------------- the sum


class UnscorableItemError(ValueError):
    """A rule function or a reward model could not score an item (it raised, or a function
    returned no finite number).

    A client error: the item is outside what the function handles (e.g. a prompt the
    task's judge does not know), or a reward model fails on it even alone. HTTP answers 422
    with the message; the handle raises it and `RewardClient` does not retry it.
    """


@dataclass(frozen=True)
class ItemReward:
    """One item's reward, and the reward models' own scores it was made from."""

    reward: float
    member_scores: tuple[float, ...]
    """Each reward model's score (K,) before aggregation and model_weight; () without a model."""

    @property
    def reward_std(self) -> float:
        """How far the members disagree: the population std of their scores."""
        return population_std(self.member_scores)


@dataclass
class RewardSum:
    """`model_weight * aggregate(members) + sum_i w_i * f_i`, over a batch of (prompt, response) pairs."""

    models: dict[str, RewardModel] = field(default_factory=dict)
    """Member name -> reward model, in the ensemble's order; one (named `SINGLE`) for a plain
    reward model folder, none for rule functions alone."""
    model_weight: float = 1.0
    functions: list[WeightedFunction] = field(default_factory=list)
    aggregation: str = "mean"
    """A key of `AGGREGATIONS`."""
    std_coef: float = 1.0

    @classmethod
    def from_config(cls, cfg: TameConfig, device: str = "cpu") -> RewardSum:
        check_reward_config(cfg)
        models = {}
        if cfg.model.reward is not None:
            for name, folder in reward_members("model.reward", cfg.model.reward).items():
                models[name] = RewardModel.load(
                    folder,
                    chat_template=cfg.data.chat_template,
                    max_length=cfg.reward.max_length,
                    dtype=cfg.model.dtype,
                    device=device,
                )
        r = cfg.reward
        return cls(models, r.model_weight, load_functions(r.functions), r.ensemble.aggregation, r.ensemble.std_coef)

    def score_each(self, prompts: list[str], responses: list[str]) -> list[ItemReward | UnscorableItemError]:
        """The reward of every item, or the error that kept one item from being scored.

        Errors are returned per item, not raised, so that one bad item cannot fail the
        other items it was batched with (which may belong to other callers). Each reward
        model scores the whole batch in one forward pass.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        by_member = [self._member_scores(name, m, prompts, responses) for name, m in self.models.items()]  # (K, B)
        aggregate = AGGREGATIONS[self.aggregation]
        results: list[ItemReward | UnscorableItemError] = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            members = [scores[i] for scores in by_member]
            error = next((s for s in members if isinstance(s, UnscorableItemError)), None)
            if error is not None:
                results.append(error)
                continue
            total = self.model_weight * aggregate(members, self.std_coef) if members else 0.0
            for wf in self.functions:
                try:
                    value = wf.function(p, r)
                except Exception as e:  # the function's verdict on this input, not a server fault
                    error = UnscorableItemError(f"reward function {wf.name} failed: {type(e).__name__}: {e}")
                    break
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    error = UnscorableItemError(f"reward function {wf.name} returned {value!r}, not a finite number")
                    break
                total += wf.weight * float(value)
            results.append(error if error is not None else ItemReward(total, tuple(members)))
        return results

    @staticmethod
    def _member_scores(
        name: str, model: RewardModel, prompts: list[str], responses: list[str]
    ) -> list[float | UnscorableItemError]:
        """One reward model's scores of the batch. When its forward pass raises, the items are
        scored again one at a time, so an item the model cannot take fails alone and its
        neighbours (other callers' items among them) are scored; an item that fails even
        alone is unscorable."""
        try:
            return model.score(prompts, responses)
        except Exception as e:  # judged item by item below
            if len(prompts) == 1:
                label = "reward model" if name == SINGLE else f"reward model {name}"
                return [UnscorableItemError(f"{label} failed: {type(e).__name__}: {e}")]
        return [s for p, r in zip(prompts, responses) for s in RewardSum._member_scores(name, model, [p], [r])]

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The rewards of all items; raises UnscorableItemError naming the first bad item."""
        scores = self.score_each(prompts, responses)
        for i, s in enumerate(scores):
            if isinstance(s, UnscorableItemError):
                raise UnscorableItemError(f"item {i}: {s}")
        return [s.reward for s in scores]
