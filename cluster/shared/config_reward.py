"""The config sections of how the reward service sums its rewards: the rule functions
(`reward.functions`) and the aggregation of a reward-model ensemble (`reward.ensemble`,
docs/reward-ensembles.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cluster.shared.config_stages import Section


class RewardFunctionConfig(Section):
    function: str = Field(..., pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """A Python callable `module:function` taking (prompt: str, response: str) and returning a float."""
    weight: float = 1.0
    """Weight of this callable in the summed reward."""


class EnsembleConfig(Section):
    aggregation: Literal["mean", "min", "mean_minus_std"] = "mean"
    """How the scores of a reward-model ensemble (model.reward a folder with ensemble.json)
    become the one model score of an item: `mean` over the members; `min`, the worst case;
    `mean_minus_std`, uncertainty-weighted: mean - std_coef x std (population std over the
    members). Coste et al. 2023 found the last two nearly remove over-optimisation. With one
    reward model all three are its score."""
    std_coef: float = Field(1.0, ge=0.0, le=100.0)
    """The std's weight in `mean_minus_std` (ignored by the other aggregations)."""
