"""The sections of the config of stages 1 and 2 (`tame sft`, `tame train-rm`), and `Section`,
the base of every section of `cluster.shared.config.TameConfig`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SFTConfig(Section):
    data: str = "runs/assets/small/data/sft.jsonl"
    """JSONL of {"prompt", "response"} demonstrations (or a local Hugging Face dataset folder)."""
    init: str | None = None
    """Causal LM to start from; null uses model.policy."""
    output: str = "runs/sft"
    """Where the fine-tuned policy is saved (Hugging Face format)."""
    epochs: int = Field(2, ge=1)
    """Passes over the data."""
    batch_size: int = Field(16, ge=1)
    """Sequences per optimizer step."""
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    """AdamW learning rate (linear decay after a short warm-up)."""
    max_length: int = Field(256, ge=8)
    """Longest prompt plus response in tokens; longer examples are truncated."""


class RewardModelTrainConfig(Section):
    data: str = "runs/assets/small/data/preferences.jsonl"
    """JSONL of {"prompt", "chosen", "rejected"} pairs (or a local Hugging Face dataset folder)."""
    init: str | None = None
    """Model to start from: a sequence-classification folder, or a causal-LM folder (such as
    the SFT policy) whose body is reused under a fresh score head; null uses model.reward."""
    output: str = "runs/rm"
    """Where the trained reward model is saved (Hugging Face format)."""
    epochs: int = Field(1, ge=1)
    """Passes over the training pairs."""
    batch_size: int = Field(16, ge=1)
    """Pairs per optimizer step."""
    learning_rate: float = Field(5e-4, gt=0.0, le=1.0)
    """AdamW learning rate."""
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of pairs held out to measure pairwise accuracy."""
    max_length: int = Field(256, ge=8)
    """Longest prompt plus response in tokens."""
    members: int = Field(1, ge=1, le=64)
    """Reward models to train (`tame train-rm --members K`): 1 writes one reward model folder at
    `output`; K >= 2 an ensemble, `output/member-<i>/` trained with seed run.seed + i and
    `output/ensemble.json` (docs/reward-ensembles.md). Every member is held out on the same pairs."""
    bootstrap: bool = False
    """Train each member on a bootstrap resample of the training pairs (as many, drawn with
    replacement, from its own seed), so members differ by data as well as by seed."""
