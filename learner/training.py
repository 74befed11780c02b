"""Small pieces shared by the PPO learner and the SFT stage: threads, learning-rate
schedules and the demonstration loss."""

from __future__ import annotations

import math
import os

import torch

from cluster.shared.logprobs import response_logprobs
from learner import ppo


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_torch_threads(n: float | int) -> int:
    """Use `n` intra-op threads (at least 1, at most the cores available); returns it.

    Ray also sets the thread count of an actor from its num_cpus; setting it here makes the
    same true outside Ray, so the roles do not fight over the cores.
    """
    threads = max(1, min(int(n), available_cores()))
    torch.set_num_threads(threads)
    return threads


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear
    warm-up over `warmup_steps`, then constant, linear decay to 0 or cosine decay to 0 at
    `total_steps`. Steps past `total_steps` keep the final value."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, warmup_steps, total_steps)
    )


def demonstration_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    normaliser: float | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of the response tokens of a batch (the SFT loss, and the
    pretraining term of PPO-ptx): a sum over response tokens / normaliser (default: their
    count). input_ids, attention_mask: (B, L); loss_mask: (B, L-1) -> scalar."""
    offset = int(loss_mask.any(0).nonzero()[0])
    window = loss_mask[:, offset:]
    logp, _ = response_logprobs(model, input_ids, attention_mask, window, offset)
    return ppo.nll_loss(logp, window, normaliser)
