"""The frozen reference model inside a rollout actor (`rollout.reference_logprobs`).

PPO's KL term needs log pi_ref of every response token. The reference never changes, so
any process holding a copy can compute it; the actor does, while the reward service scores
the same responses, and the learner (the slower role in most runs) skips that forward pass.
The numbers are the learner's: the same float32 weights (the config refuses a 16-bit
`learner.param_dtype` beside this), the same function (`cluster.shared.logprobs.response_logprobs`),
the same arithmetic (`learner.compute_dtype`) and sampling temperature.
"""

from __future__ import annotations

import time

import torch

from cluster.shared.config import TameConfig
from cluster.shared.logprobs import response_logprobs, response_positions
from cluster.shared.precision import compute_context
from cluster.shared.records import Rollout
from cluster.shared.startup import heavy_imports


class Reference:
    """log pi_ref of response tokens, a micro-batch (`ppo.micro_batch_size` rollouts) at a time."""

    def __init__(self, cfg: TameConfig, pad_id: int):
        with heavy_imports():
            from transformers import AutoModelForCausalLM

        # On a GPU actor Ray leaves one device visible: the engine's.
        self.device = torch.device("cuda" if cfg.rollout.num_gpus > 0 else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model.policy, dtype=torch.float32)
        self.model.eval().requires_grad_(False).to(self.device)
        self.pad_id = pad_id
        self.temperature = cfg.rollout.sampling.temperature
        self.compute_dtype = cfg.learner.compute_dtype
        self.micro_batch_size = cfg.ppo.micro_batch_size

    @torch.no_grad()
    def annotate(self, rollouts: list[Rollout]) -> float:
        """Write `reference_logprobs` into every rollout; returns the seconds it took."""
        start = time.perf_counter()
        for first in range(0, len(rollouts), self.micro_batch_size):
            chunk = rollouts[first : first + self.micro_batch_size]
            input_ids, attention_mask, mask, starts = response_positions(
                [r.prompt_token_ids for r in chunk], [r.response_token_ids for r in chunk], self.pad_id
            )
            offset = min(starts)  # no position before the earliest response reaches the LM head
            mask = mask[:, offset:]
            with compute_context(self.device, self.compute_dtype):
                logp, _ = response_logprobs(
                    self.model,
                    input_ids.to(self.device),
                    attention_mask.to(self.device),
                    mask.to(self.device),
                    offset,
                    self.temperature,
                )
            logp = logp.cpu()
            for row, (r, s) in enumerate(zip(chunk, starts)):
                r.reference_logprobs = logp[row, s - offset : s - offset + len(r.response_token_ids)].tolist()
        return time.perf_counter() - start
