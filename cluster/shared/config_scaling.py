"""The config sections of what scales while a run goes: the rollout pool (`rollout.autoscale`,
the rule in `cluster.autoscale`) and the reward replicas (Serve's own autoscaling)."""

from __future__ import annotations

from pydantic import Field, model_validator

from cluster.shared.config_stages import Section

MAX_ACTORS = 1024


class AutoscaleConfig(Section):
    min_actors: int = Field(1, ge=1, le=MAX_ACTORS)
    """Fewest rollout actors the rule keeps."""
    max_actors: int = Field(..., ge=1, le=MAX_ACTORS)
    """Most rollout actors the rule asks for (more than the cluster holds now is allowed: the
    run asks Ray's autoscaler for them and goes on with those it gets)."""
    window: int = Field(2, ge=1, le=100)
    """Updates measured before each decision: the learner's update time and the actors' busy
    time, summed over the window."""
    cooldown: int = Field(2, ge=0, le=100)
    """Updates left unmeasured after a change and at the start, while new engines warm up and
    load their first weights."""
    slack: float = Field(0.05, ge=0.0, lt=1.0)
    """The pool is sized to the fewest actors predicted to give at least 1 - slack of the
    samples/s that max_actors would: 0 asks for every actor that still helps, however little."""
    margin: float = Field(0.1, ge=0.0, le=1.0)
    """Share of extra work that fewer actors must still be predicted to cover before the pool
    shrinks: a steady load whose measurements vary by less never moves the pool back and forth."""

    wait: float = Field(0.1, ge=0.0, le=1.0)
    """Share of the time the learner may wait for data before the pool grows beyond the
    predicted size (the prediction cannot see long-tailed calls nor slower actors)."""
    step: float = Field(1.5, gt=1.0, le=4.0)
    """Factor by which the pool tries to grow beyond the prediction."""
    min_gain: float = Field(0.1, ge=0.0, le=1.0)
    """What a try must pay to be kept: samples/s must rise by at least this share of the
    actors' rise (0.1: 50% more actors, at least 5% more samples/s); otherwise the pool goes
    back and tries no further until the work changes (`cluster.autoscale.WORK_CHANGED`)."""

    @model_validator(mode="after")
    def _bounds_in_order(self) -> AutoscaleConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) is greater than max_actors ({self.max_actors})")
        return self


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0)
    """Serve autoscaling: fewest replicas."""
    max_replicas: int = Field(1, ge=1)
    """Serve autoscaling: most replicas."""
    target_ongoing_requests: float = Field(2.0, gt=0.0)
    """Serve autoscaling: ongoing requests per replica to aim for."""
