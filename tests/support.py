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
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()  # (R, V)
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


def peak_rss(_self=None) -> int:
    """This process's peak resident bytes (the kernel's high-water mark, VmHWM); `_self` lets
    an actor's `__ray_call__` run it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def peak_rss_of_a_learner_process() -> int:
    """`peak_rss` of a process that imported what a learner imports and holds no model."""
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401

    import learner.learner  # noqa: F401

    return peak_rss()


def worker_peaks(learner) -> list[int]:
    """`peak_rss` of each worker of a learner actor, rank 0 first."""
    import ray

    return ray.get(
        learner.__ray_call__.remote(
            lambda self: [peak_rss(), *ray.get([w.__ray_call__.remote(peak_rss) for w in getattr(self, "workers", [])])]
        )
    )


def local_weight_bytes(learner) -> int:
    """The bytes of weights a learner actor (rank 0) holds itself: its shards when sharded."""
    import ray

    return ray.get(
        learner.__ray_call__.remote(
            lambda self: sum(
                p.to_local().numel() * p.element_size()
                for m in (self.policy, self.reference, self.critic)
                if m is not None
                for p in m.parameters()
            )
        )
    )


def bfloat16_copy(source, out):
    """The Hugging Face model at `source` saved again in bfloat16 at `out`, with its tokenizer:
    a model that, like most released ones, is published in bfloat16. Returns `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out
