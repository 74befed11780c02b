"""Stage 1, `tame sft`: supervised fine-tuning of the policy on demonstrations.

The loss is the negative log-likelihood of the response tokens only: the prompt (through
the chat template, exactly as the rollout actors will see it) is context, not a target.
Each batch is padded to its own longest sequence, and only response positions go through
the LM head, so short demonstrations train fast on CPU.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cluster.shared.config import TameConfig
from cluster.shared.files import atomic_directory
from cluster.shared.precision import compute_context, disable_dropout
from cluster.shared.threads import available_cores, set_torch_threads
from cluster.shared.tokens import pad_token_id
from learner.data import (
    DataError,
    collate_demonstrations,
    encode_demonstrations,
    read_demonstrations,
)
from learner.training import demonstration_nll, make_scheduler

__all__ = ["DataError", "run_sft"]

WARMUP_SHARE = 0.03
"""Share of the optimizer steps spent warming the learning rate up (then linear decay)."""
LOG_LINES = 20
"""About this many progress lines per run."""


def run_sft(cfg: TameConfig, log: Callable[[str], None] = print) -> Path:
    """Fine-tune cfg.sft.init (or cfg.model.policy) on cfg.sft.data and save the model and
    its tokenizer in Hugging Face format at cfg.sft.output (written atomically).

    Raises DataError (a ValueError) naming the file and line of a bad record.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = cfg.sft
    threads = set_torch_threads(available_cores())
    device = torch.device(cfg.learner.device)
    torch.manual_seed(cfg.run.seed)
    init = s.init or cfg.model.policy

    # data: (prompt, response) -> token ids exactly as the rollout actors will see them
    tokenizer = AutoTokenizer.from_pretrained(init)
    rows = read_demonstrations(s.data)
    examples = encode_demonstrations(tokenizer, rows, s.max_length, cfg.data.chat_template)
    if not examples:
        raise DataError(f"{s.data}: every prompt fills sft.max_length ({s.max_length}) tokens")
    pad_id = pad_token_id(tokenizer)

    # model and optimizer: float32 weights, forward passes in learner.compute_dtype
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    disable_dropout(model)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / s.batch_size)
    total_steps = s.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, "linear", max(1, int(WARMUP_SHARE * total_steps)), total_steps)
    log(
        f"sft: {len(examples)} examples from {s.data} ({len(rows) - len(examples)} left out), "
        f"{n_params(model) / 1e6:.2f}M parameters, {total_steps} steps of {s.batch_size}, "
        f"{threads} threads on {device}"
    )

    # training: shuffled batches, each padded to its longest example
    rng = random.Random(cfg.run.seed)
    every = max(1, total_steps // LOG_LINES)
    started, step, recent = time.perf_counter(), 0, []
    for epoch in range(s.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), s.batch_size):
            batch = [examples[i] for i in order[start : start + s.batch_size]]
            ids, attention, loss_mask = collate_demonstrations(batch, pad_id, device)
            with compute_context(device, cfg.learner.compute_dtype):
                loss = demonstration_nll(model, ids, attention, loss_mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            recent.append(float(loss.detach()))
            if not math.isfinite(recent[-1]):
                raise RuntimeError(f"sft: the loss became {recent[-1]} at step {step}; lower sft.learning_rate")
            if step % every == 0 or step == total_steps:
                elapsed = time.perf_counter() - started
                log(
                    f"sft epoch {epoch + 1}/{s.epochs} step {step}/{total_steps} "
                    f"loss {sum(recent) / len(recent):.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                    f"{step * s.batch_size / elapsed:.0f} examples/s"
                )
                recent = []

    # save in Hugging Face format with the tokenizer, so PPO and vLLM load it directly
    output = Path(s.output)
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
    log(f"sft: saved to {output} in {time.perf_counter() - started:.1f} s")
    return output


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
