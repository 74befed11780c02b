"""Small helpers several test modules share."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import psutil
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process(pid: int) -> psutil.Process | None:
    """The live process of a PID, or None when it is gone."""
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def hf_logprobs(model, prompt_ids: list[int], response_ids: list[int], temperature: float) -> np.ndarray:
    """log_softmax(logits / T) of each response token under a transformers model: the
    reference the engines' and the learner's log-probs are checked against."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1: -1].float()  # (R, V)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, torch.tensor(response_ids)[:, None])[:, 0].numpy()


@contextmanager
def lm_head_outputs(model) -> Iterator[list[torch.Tensor]]:
    """The logits of every forward pass through the model's LM head inside the block, each
    keeping its gradient: which positions reached the head, and which got gradient."""
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = model.get_output_embeddings().register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()
