"""Building a vLLM engine from the config, its sampling parameters, and reading its outputs.

Small functions without Ray, so the rollout actor, the benchmark and the tests share them.
The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): that keeps one process per
actor and lets the actor reach the model to load new weights (`actors.weights`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from typing import Any

from cluster.shared.config import TameConfig
from cluster.shared.lora import adapter_layout, adapter_modules, engine_args
from cluster.shared.records import Prompt, Rollout, Scores
from cluster.shared.startup import heavy_imports
from cluster.shared.tokens import prompt_token_ids

# vLLM reports these finish reasons; the records carry only "stop" or "length".
FINISH_REASONS = {"stop": "stop", "length": "length"}


def configure_vllm_env(threads: int | None = None) -> None:
    """Environment vLLM reads at import time: an in-process engine computing with `threads`
    threads (None leaves the count alone). Call before `import vllm`.

    vLLM keeps torch's thread count when OMP_NUM_THREADS is set and drops it to 1 otherwise;
    Ray sets OMP_NUM_THREADS from an actor's num_cpus, so both are set here."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is not None:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def build_engine(cfg: TameConfig, seed: int) -> Any:
    """A vLLM `LLM` for `cfg.model.policy` with the rollout section's limits.

    Log-probs are "processed": taken after temperature, top-k and top-p, so they are the
    log-probs of the distribution the tokens were actually sampled from. With top_p=1 and
    top_k=-1 that is exactly log_softmax(logits / temperature), what the learner computes.
    """
    configure_vllm_env()
    with heavy_imports():  # also spares LLM()'s own collections the scan of the import's objects
        from vllm import LLM
        from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    eager = cpu if cfg.rollout.enforce_eager is None else cfg.rollout.enforce_eager
    if eager:
        # Eager means nothing compiled, also the few sampler helpers vLLM wraps in
        # torch.compile: on a CPU, their first calls cost an inductor build of seconds at every
        # start, and each later call a dispatch slower than the eager op.
        import torch._dynamo

        torch._dynamo.config.disable = True
    if cpu:
        # Sizes the KV cache directly (VLLM_CPU_KVCACHE_SPACE takes only whole GiB).
        memory = {"kv_cache_memory_bytes": int(cfg.rollout.kv_cache_gib * 2**30)}
    else:
        memory = {"gpu_memory_utilization": cfg.rollout.gpu_memory_utilization}
    kernels = contextlib.nullcontext()
    if cfg.learner.lora is not None:  # each version is an adapter (actors/adapters.py)
        from actors.lora_kernels import single_adapter_kernels

        modules = adapter_modules(adapter_layout(cfg))
        memory.update(engine_args(cfg.learner.lora, cfg.train.max_staleness, modules))
        # Every call runs under one adapter: on CPU, dense LoRA kernels for such steps.
        kernels = single_adapter_kernels()
    with kernels:
        return LLM(
            model=cfg.model.policy,
            tokenizer=cfg.model.policy,
            dtype=cfg.model.dtype,
            max_model_len=cfg.rollout.max_model_len,
            seed=seed,
            **memory,
            logprobs_mode="processed_logprobs",
            # CUDA graphs point at the weights' memory, and weight loads copy into that memory in
            # place (reload_weights), so graphs stay valid on GPUs. CPU has none.
            enforce_eager=eager,
        )


def sampling_params(cfg: TameConfig, max_new_tokens: int | None = None) -> Any:
    """vLLM `SamplingParams` from `cfg.rollout.sampling`, asking for the sampled token's log-prob."""
    from vllm import SamplingParams

    s = cfg.rollout.sampling
    return SamplingParams(
        n=s.samples_per_prompt,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_tokens=max_new_tokens or s.max_new_tokens,
        stop=list(s.stop) or None,
        logprobs=0,  # only the sampled token's log-prob
        flat_logprobs=True,  # a few flat lists per sequence instead of one dict per token
        # Stop strings are matched on text, so only they need vLLM's per-token detokenizing;
        # otherwise each response is decoded once at the end, which is cheaper on CPU
        # (benchmarks/README.md, "Measured by hand").
        detokenize=bool(s.stop),
        skip_special_tokens=True,
    )


def encode_prompts(
    tokenizer: Any, prompts: Sequence[Prompt], chat_template: bool, max_model_len: int
) -> list[list[int]]:
    """Prompt token ids as the policy sees them (`cluster.shared.tokens.prompt_token_ids`).

    Raises ValueError naming the prompt when one leaves no room for a response: the data
    loader should have rejected it, and vLLM would otherwise fail the whole batch.
    """
    encoded = []
    for prompt in prompts:
        ids = prompt_token_ids(tokenizer, prompt.messages, chat_template)
        if len(ids) >= max_model_len:
            raise ValueError(
                f"prompt {prompt.prompt_id!r} has {len(ids)} tokens, which leaves no room for a "
                f"response within rollout.max_model_len={max_model_len}"
            )
        encoded.append(ids)
    return encoded


def run_generate(llm: Any, prompt_ids: Sequence[list[int]], params: Any, adapter: Any = None) -> list[Any]:
    """vLLM `RequestOutput`s for already tokenised prompts, in prompt order, under the LoRA
    adapter `adapter` (a `LoRARequest`) when given."""
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    return llm.generate(prompts, params, use_tqdm=False, lora_request=adapter)


def sampled_logprobs(completion: Any) -> list[float]:
    """log pi(token) of each sampled token of one vLLM `CompletionOutput`."""
    logprobs = completion.logprobs
    token_ids = completion.token_ids
    flat = getattr(logprobs, "logprobs", None)
    if flat is not None and len(flat) == len(token_ids):
        # With logprobs=0 each position holds exactly the sampled token.
        return list(flat)
    # General form: a mapping token id -> Logprob per position.
    return [position[token].logprob for position, token in zip(logprobs, token_ids)]


def apply_scores(rollouts: list[Rollout], scores: Sequence[float] | Scores, score_seconds: float) -> set[str]:
    """Write `scores` (one per rollout, in order; with a `Scores` record, the reward models'
    spread too) into the records; return the prompt ids whose score is not a finite number, so
    those prompts are handed out again rather than trained on."""
    spread = scores.reward_std if isinstance(scores, Scores) else [None] * len(rollouts)
    scores = scores.rewards if isinstance(scores, Scores) else scores
    if len(scores) != len(rollouts) or len(spread) != len(rollouts):
        raise ValueError(f"the scorer returned {len(scores)} scores for {len(rollouts)} responses")
    bad = set()
    for rollout, score, std in zip(rollouts, scores, spread):
        value = float(score)
        if not math.isfinite(value):
            bad.add(rollout.prompt_id)
        rollout.score = value
        rollout.reward_std = std
        rollout.score_seconds = score_seconds
    return bad
