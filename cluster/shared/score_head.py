"""The score head of a sequence-classification checkpoint: reward models, and the critic the
learner makes from one (`learner.critic: reward`).

The head may carry a bias: reward-model training normalises the scores by shifting it (the
InstructGPT recipe), but Llama's `GenericForSequenceClassification` head is built without
one, so plain `from_pretrained` drops `score.bias` from the checkpoint with an "unexpected
key" warning. These put it back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cluster.shared.hf_folder import read_tensor

SCORE_BIAS_KEY = "score.bias"


def set_score_bias(model: nn.Module, bias: float | torch.Tensor) -> None:
    """Give the score head a bias (adding one if it has none) equal to `bias`."""
    head: nn.Linear = model.score
    bias_t = torch.as_tensor(bias, dtype=head.weight.dtype, device=head.weight.device).reshape(head.out_features)
    if head.bias is None:
        new = nn.Linear(
            head.in_features, head.out_features, bias=True, device=head.weight.device, dtype=head.weight.dtype
        )
        with torch.no_grad():
            new.weight.copy_(head.weight)
        model.score = new
        head = new
    with torch.no_grad():
        head.bias.copy_(bias_t)


def restore_score_bias(model: nn.Module, path: str | Path) -> bool:
    """Give a model loaded with `from_pretrained(path)` the score bias its checkpoint holds
    but its class dropped. True if there was one."""
    bias = read_tensor(path, SCORE_BIAS_KEY)
    if bias is not None:
        set_score_bias(model, bias)
    return bias is not None
