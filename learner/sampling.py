"""Sampling rollouts with transformers, without vLLM: for tests, benchmarks and small
evaluations. Plain ancestral sampling at a temperature (no top-k or top-p), so the
recorded log-probs are those of the distribution the tokens were drawn from."""

from __future__ import annotations

import time
from typing import Any

import torch

from cluster.shared.records import Rollout
from cluster.shared.tokens import pad as pad_batch
from cluster.shared.tokens import pad_token_id, prompt_token_ids


@torch.no_grad()
def sample_rollouts(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    policy_version: int = 0,
    chat_template: bool = True,
) -> list[Rollout]:
    """One sampled response per prompt, with its behaviour log-probs (unscored).

    Prompts are left-padded with explicit position ids, and a KV cache carries the
    generation, so one batched forward per new token serves every prompt.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    started = time.perf_counter()
    prompt_ids = [prompt_token_ids(tokenizer, p, chat_template) for p in prompts]
    pad_id = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    batch = len(prompts)
    input_ids, attention = pad_batch(prompt_ids, pad_id, side="left")
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(1) - 1).clamp(min=0)

    responses: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    done = torch.zeros(batch, dtype=torch.bool)
    past, step_ids, step_pos = None, input_ids, positions
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids, attention_mask=attention, position_ids=step_pos, past_key_values=past, use_cache=True
        )
        past = out.past_key_values
        logp = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1).cpu()  # (B, V)
        token = torch.multinomial(logp.exp(), 1, generator=generator)  # (B, 1)
        token_logp = logp.gather(1, token)[:, 0]
        for b in range(batch):
            if not done[b]:
                responses[b].append(int(token[b]))
                logprobs[b].append(float(token_logp[b]))
        done |= token[:, 0] == eos
        if bool(done.all()):
            break
        step_ids = token.to(device)
        step_pos = step_pos[:, -1:] + 1
        attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype, device=device)], dim=1)
    seconds = time.perf_counter() - started
    return [
        Rollout(
            prompt_id=str(i),
            sample_index=0,
            prompt_text=prompt,
            prompt_token_ids=prompt_ids[i],
            response_token_ids=responses[i],
            response_text=tokenizer.decode(responses[i], skip_special_tokens=True),
            behaviour_logprobs=logprobs[i],
            finish_reason="stop" if responses[i][-1] == eos else "length",
            policy_version=policy_version,
            actor_id=-1,
            generate_seconds=seconds,
        )
        for i, prompt in enumerate(prompts)
    ]
