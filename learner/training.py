"""Small pieces shared by the PPO learner and the SFT stage: threads, learning-rate
schedules and the demonstration loss."""

from __future__ import annotations

import math

import torch

from cluster.shared.config import TameConfig
from cluster.shared.logprobs import response_logprobs
from learner import ppo


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


def optimizers_for(
    models: dict[str, torch.nn.Module], cfg: TameConfig
) -> tuple[dict[str, torch.optim.Optimizer], dict[str, torch.optim.lr_scheduler.LRScheduler]]:
    """An AdamW over the trained parameters (a LoRA policy's adapter) and its learning-rate
    schedule for each trained model, by the model's name
    ("policy" at ppo.learning_rate, "critic" at ppo.critic_learning_rate), scheduled over the
    run's optimizer steps."""
    p = cfg.ppo
    rates = {"policy": p.learning_rate, "critic": p.critic_learning_rate}
    total_steps = cfg.train.total_updates * p.epochs * math.ceil(cfg.train.rollout_batch_size / p.minibatch_size)
    optimizers = {
        name: torch.optim.AdamW(
            [t for t in model.parameters() if t.requires_grad], lr=rates[name], weight_decay=p.weight_decay
        )
        for name, model in models.items()
    }
    schedulers = {
        name: make_scheduler(optimizer, p.lr_schedule, p.warmup_steps, total_steps)
        for name, optimizer in optimizers.items()
    }
    return optimizers, schedulers


def ptx_examples(cfg: TameConfig, tokenizer) -> list:
    """The demonstrations of PPO-ptx (`ppo.ptx_data`), encoded; none without the term."""
    from learner.data import encode_demonstrations, read_demonstrations

    if cfg.ppo.ptx_coef == 0:
        return []
    rows = read_demonstrations(cfg.ppo.ptx_data)
    return encode_demonstrations(tokenizer, rows, cfg.rollout.max_model_len, cfg.data.chat_template)


def ptx_backward(
    policy: torch.nn.Module, batch: list, shards, micro_batch_size: int, pad_id: int, cfg: TameConfig
) -> torch.Tensor:
    """PPO-ptx (InstructGPT): the gradient of `ppo.ptx_coef` times the NLL of the
    demonstrations `batch` (response tokens only, over all of their tokens), this worker's
    rows of it (`Shards.rows`). Returns this worker's part of the NLL: the caller sums it over
    the workers."""
    from cluster.shared.precision import compute_context
    from learner.data import collate_demonstrations

    device = next(policy.parameters()).device
    n_tokens = float(sum(len(e.input_ids) - e.prompt_length for e in batch))
    total = torch.zeros((), device=device)
    for rows, stand_in in shards.rows(torch.arange(len(batch)), micro_batch_size):
        ids, attention, loss_mask = collate_demonstrations([batch[i] for i in rows.tolist()], pad_id, device)
        with compute_context(device, cfg.learner.compute_dtype):
            # At temperature 1, as SFT trained: at T the term would pull the logits towards T
            # times the SFT model's, away from where the KL term holds them.
            nll = demonstration_nll(policy, ids, attention, loss_mask, n_tokens)
        ((0.0 if stand_in else cfg.ppo.ptx_coef) * nll).backward()
        if not stand_in:
            total += nll.detach()
    return total
