"""A Hugging Face sequence-classification reward model: (prompt, response) text -> one score.

Text becomes tokens exactly as the policy saw it (`cluster.shared.tokens.prompt_token_ids` then
`response_token_ids`, which ends with EOS), and the score is the head's output at the last
token. Serving, benchmarks and reward-model training all go through `sequence_scores`, so
a score means the same thing everywhere.

The score head may carry a bias (`cluster.shared.score_head`), which plain `from_pretrained`
drops; `load_reward_model` puts it back: load reward models with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cluster.shared.errors import UserError
from cluster.shared.hf_folder import read_tensor
from cluster.shared.precision import disable_dropout, float32_head, zero_dropout_rates
from cluster.shared.score_head import SCORE_BIAS_KEY, set_score_bias
from cluster.shared.startup import heavy_imports
from cluster.shared.tokens import pad, prompt_token_ids, response_token_ids


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores (B,) of right-padded sequences (B, T): the head's output at each row's last real token.

    Reads the head at position `len_b - 1` explicitly rather than trusting the model's own
    pooling, which finds the last token by comparing ids with `config.pad_token_id` and
    silently picks the wrong position when that id is unset or equals EOS. The body runs in
    its own dtype (or under the caller's autocast); the head in float32, so scores are not
    rounded to bfloat16's three digits.
    """
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    last = attention_mask.sum(dim=1) - 1  # (B,)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return float32_head(model.score, pooled).squeeze(-1)  # (B,)


# ------------------------------------------------------------------------- load / save


def load_reward_model(
    path: str | Path, *, dtype: str = "float32", device: str = "cpu", init_head: bool = False
) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) of a sequence-classification reward model.

    `init_head=True` accepts a causal-LM folder (such as the SFT policy) and builds its
    sequence-classification class with a fresh one-output score head over the same body.
    Dropout is disabled and `config.pad_token_id` is set from the tokenizer; a model whose
    PAD equals EOS is refused, because right padding would then be indistinguishable from
    the EOS that ends every response. A folder that is not such a model is a UserError
    naming the path; the caller adds the config key that gave it.
    """
    with heavy_imports():
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(
            f"{path}: the tokenizer needs a PAD token distinct from EOS "
            f"(pad={tokenizer.pad_token_id}, eos={tokenizer.eos_token_id})"
        )
    config = AutoConfig.from_pretrained(path)
    is_seq_cls = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if not is_seq_cls and not init_head:
        raise UserError(f"{path}: not a sequence-classification model (architectures {config.architectures})")
    if is_seq_cls and config.num_labels != 1:
        raise UserError(f"{path}: a reward model has one output, this one has {config.num_labels}")
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    zero_dropout_rates(config)
    bias = read_tensor(path, SCORE_BIAS_KEY) if is_seq_cls else None
    # Transformers reports our own score.bias (put back below) as UNEXPECTED, and a causal
    # LM's lm_head and missing score head likewise: both are intended, so keep that load
    # report out of the logs.
    verbosity = hf_logging.get_verbosity()
    if bias is not None or not is_seq_cls:
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=getattr(torch, dtype))
    finally:
        hf_logging.set_verbosity(verbosity)
    model.score.float()  # the head computes in float32 whatever the body's dtype
    if bias is not None:
        set_score_bias(model, bias)
    disable_dropout(model)
    return model.to(device).eval(), tokenizer


def save_reward_model(model: nn.Module, tokenizer: Any, out: str | Path) -> None:
    """Save in Hugging Face format (weights with `score.bias`, config, tokenizer)."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ------------------------------------------------------------------------- text -> score


@dataclass
class RewardModel:
    """A loaded reward model with the text-to-tokens rule of the whole project."""

    model: nn.Module
    tokenizer: Any
    chat_template: bool = True
    max_length: int = 512
    """Tokens per item; longer inputs keep their last tokens (the response and its EOS)."""

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        chat_template: bool = True,
        max_length: int = 512,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> RewardModel:
        model, tokenizer = load_reward_model(path, dtype=dtype, device=device)
        positions = getattr(model.config, "max_position_embeddings", None) or max_length
        return cls(model, tokenizer, chat_template, min(max_length, positions))

    def encode(self, prompt: str, response: str) -> list[int]:
        """Prompt ids (chat template, assistant turn opened) + response ids + EOS, last tokens kept."""
        ids = prompt_token_ids(self.tokenizer, prompt, self.chat_template) + response_token_ids(
            self.tokenizer, response
        )
        return ids[-self.max_length :]

    @torch.inference_mode()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Scores of token id lists, in one right-padded forward pass."""
        if not sequences:
            return []
        device = self.model.score.weight.device
        input_ids, attention_mask = pad(sequences, self.tokenizer.pad_token_id)
        scores = sequence_scores(self.model, input_ids.to(device), attention_mask.to(device))
        return scores.float().cpu().tolist()

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses, strict=True)])
