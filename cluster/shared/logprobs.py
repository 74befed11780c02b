"""Log-probs of tokens under a causal language model: one definition for every role that
computes them: the learner's passes and the rollout actors' reference log-probs
(`rollout.reference_logprobs`)."""

from __future__ import annotations

import torch

from cluster.shared.tokens import pad


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 log softmax(logits / temperature). At temperature 1 the cast happens inside the
    log-softmax: one vocabulary-sized float32 tensor fewer, the same numbers."""
    if temperature != 1.0:
        logits = logits.float() / temperature
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) of the given tokens.

    logits: (..., V) predicting `tokens`: (...) -> (...), e.g. (B, T, V), (B, T) -> (B, T).
    The division by the sampling temperature makes these the log-probs of the distribution
    the tokens were sampled from.
    """
    logp = _log_softmax(logits, temperature)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position. (..., V) -> (...)."""
    logp = _log_softmax(logits, temperature)
    return -(logp.exp() * logp).sum(-1)


def logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_from_logits` and `entropy_from_logits` from one log-softmax: what the
    learner trains with when the loss has an entropy term. (..., V), (...) -> (...), (...)."""
    logp = _log_softmax(logits, temperature)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def response_positions(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Prompt + response token ids as a right-padded batch, and where each response's
    log-probs sit: position t predicts input_ids[:, t + 1], so a response after n prompt
    tokens starts at position n - 1.

    Returns input_ids and attention_mask (B, L), the response mask over the prediction
    positions 0 .. L - 2 (B, L - 1), and each row's first response position."""
    input_ids, attention_mask = pad([p + r for p, r in zip(prompts, responses)], pad_id)
    mask = torch.zeros((len(prompts), input_ids.shape[1] - 1))
    starts = [len(p) - 1 for p in prompts]
    for row, (start, response) in enumerate(zip(starts, responses)):
        mask[row, start : start + len(response)] = 1.0
    return input_ids, attention_mask, mask, starts


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask: torch.Tensor,
    offset: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token | prefix) at the response positions of a right-padded batch.

    input_ids, attention_mask: (B, L). mask: (B, W) marks the positions that count among
    the prediction positions offset .. offset + W - 1 (position t predicts
    input_ids[:, t + 1]; W = L - 1 - offset). Only those W positions go through the LM
    head (`logits_to_keep`), and only the masked ones through the softmax, so prompt
    positions cost no vocabulary-sized work.

    Returns log-probs (B, W), zero where mask is 0, and the entropy of
    softmax(logits / temperature) there (B, W) when `with_entropy`.
    """
    keep = input_ids.shape[1] - offset
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits[
        :, :-1
    ]  # (B, W, V)
    targets = input_ids[:, offset + 1 :]  # (B, W)
    selected = mask.bool()
    zeros = torch.zeros(selected.shape, device=logits.device)
    if not with_entropy:
        token_logp = logprobs_from_logits(logits[selected], targets[selected], temperature)  # (N,)
        return zeros.masked_scatter(selected, token_logp), None
    token_logp, entropy = logprobs_and_entropy(logits[selected], targets[selected], temperature)
    return zeros.masked_scatter(selected, token_logp), zeros.masked_scatter(selected, entropy)
