"""Stage 2, `tame train-rm`: train a reward model on preference pairs.

The pairwise (Bradley-Terry) loss of Stiennon et al. 2020 and Ouyang et al. 2022,

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected)),

averaged over a batch of pairs; r is the score head at the last token of the prompt and
response as the policy sees them (`reward_service.model`). A share of the pairs is held out
to measure pairwise accuracy (how often r(chosen) > r(rejected)).

After training the scores are normalised as InstructGPT did before RL: the score head's
bias (added if the head has none) is shifted so that the mean score of the TRAINING
`chosen` responses is 0. The chosen responses are the ones standing in for the
demonstrations of good behaviour, so after normalisation a positive reward means "better
than a typical preferred answer".

`init` may be a sequence-classification folder, or a causal LM (such as the SFT policy):
its body is reused under a fresh one-output score head. Dropout is off throughout, so the
scores the loss sees are the scores the service serves.

`reward_model.members` K >= 2 trains an ensemble (docs/reward-ensembles.md): K members that
differ by seed (run.seed + i: the fresh head, the order of the pairs and, with
`reward_model.bootstrap`, a resample of the training pairs), held out on the same pairs and
normalised on the same training `chosen` responses, so their scores share one scale. They are
written as `<output>/member-<i>/` beside `<output>/ensemble.json`, with each member's held-out
accuracy and the ensemble's (the mean of the members' scores).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.shared.config import TameConfig
from cluster.shared.errors import ConfigError, UserError
from cluster.shared.files import atomic_directory
from cluster.shared.precision import compute_context
from cluster.shared.reward_folder import ENSEMBLE_FILE, first_reward_model
from cluster.shared.score_head import set_score_bias
from cluster.shared.threads import available_cores, set_torch_threads
from cluster.shared.tokens import pad
from reward_service.data import DataError, PreferencePair, load_preference_pairs
from reward_service.model import (
    RewardModel,
    load_reward_model,
    save_reward_model,
    sequence_scores,
)

__all__ = ["DataError", "pairwise_loss", "train_reward_model"]

MAX_GRAD_NORM = 1.0
"""Gradient-norm clip: keeps the first steps of a fresh score head from blowing up."""


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `-log sigmoid(r_chosen - r_rejected)` over (B,) scores, and the pairwise accuracy."""
    margin = chosen_scores - rejected_scores  # (B,)
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pair_scores(
    model, pad_id: int, batch: list[tuple[list[int], list[int]]], device: str, compute_dtype: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B,) of the chosen and (B,) of the rejected sequences, in one padded forward
    (training steps run it in learner.compute_dtype; evaluation in float32)."""
    sequences = [c for c, _ in batch] + [r for _, r in batch]
    input_ids, attention_mask = pad(sequences, pad_id)
    with compute_context(device, compute_dtype):
        scores = sequence_scores(model, input_ids.to(device), attention_mask.to(device))  # (2B,)
    return scores[: len(batch)], scores[len(batch) :]


@torch.no_grad()
def _evaluate(model, pad_id: int, encoded: list[tuple[list[int], list[int]]], batch_size: int, device: str) -> dict:
    """Pairwise accuracy and loss over the pairs, and each pair's margin r(chosen) - r(rejected)."""
    model.eval()
    losses, margins = [], []
    for batch in _batches(encoded, batch_size):
        chosen, rejected = _pair_scores(model, pad_id, batch, device)
        losses.append(-F.logsigmoid(chosen - rejected).sum().item())
        margins += (chosen - rejected).tolist()
    correct = sum(m > 0 for m in margins)
    return {"accuracy": correct / len(encoded), "loss": sum(losses) / len(encoded), "margins": margins}


@torch.no_grad()
def _mean_score(model, pad_id: int, sequences: list[list[int]], batch_size: int, device: str) -> float:
    total = 0.0
    for batch in _batches(sequences, batch_size):
        input_ids, attention_mask = pad(batch, pad_id)
        total += sequence_scores(model, input_ids.to(device), attention_mask.to(device)).sum().item()
    return total / len(sequences)


def split_pairs(pairs: list[PreferencePair], eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) after a seeded shuffle; at least one pair on each side."""
    if len(pairs) < 2:
        raise DataError(f"need at least 2 preference pairs to hold some out, got {len(pairs)}")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(order) * eval_fraction)), len(order) - 1)
    return order[n_eval:], order[:n_eval]


def train_reward_model(cfg: TameConfig, log=print) -> dict:
    """Train, evaluate, normalise and save the reward model of `cfg.reward_model` (or the
    ensemble of `reward_model.members` >= 2).

    Runs on `cfg.learner.device`; on CPU with a torch thread per core this process may use, as
    SFT does (the stage runs alone, before the loop). Returns {"accuracy", "accuracy_before",
    "eval_loss", "output", "pairs", "train_pairs", "eval_pairs", "steps", "score_bias", "normalised_on", "init",
    "data", "seconds"} ("bootstrap" too when set); for an ensemble {"accuracy" (the ensemble's), "output",
    "members": {name: that summary}, "seeds", "bootstrap", "eval_pairs", "seconds"}. Raises
    DataError (a ValueError) naming the file and line of a bad pair, and ConfigError naming
    reward_model.init (or model.reward) when it is no model to start from.
    """
    threads = torch.get_num_threads()
    if cfg.learner.device == "cpu":
        set_torch_threads(available_cores())
    try:
        return _train_ensemble(cfg, log) if cfg.reward_model.members > 1 else _train(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _pairs(cfg: TameConfig, log) -> tuple[str, list[PreferencePair], list[PreferencePair], list[PreferencePair]]:
    """(init, all pairs, training pairs, held-out pairs): the held-out split comes from run.seed,
    so every member of an ensemble is measured on the same pairs."""
    rm_cfg = cfg.reward_model
    init = rm_cfg.init or cfg.model.reward
    if init is None:
        raise DataError("reward_model.init and model.reward are both null: there is no model to start from")
    if not rm_cfg.init:  # model.reward may be an ensemble: start from its first member
        init = str(first_reward_model("model.reward", init))
    pairs = load_preference_pairs(rm_cfg.data)
    train_pairs, eval_pairs = split_pairs(pairs, rm_cfg.eval_fraction, cfg.run.seed)
    log(f"{len(pairs)} preference pairs from {rm_cfg.data}: {len(train_pairs)} to train, {len(eval_pairs)} held out")
    return init, pairs, train_pairs, eval_pairs


def bootstrap_resample(pairs: list, seed: int) -> list:
    """As many pairs as given, drawn with replacement (a bootstrap resample), from `seed`."""
    return random.Random(f"bootstrap:{seed}").choices(pairs, k=len(pairs))


def _train(cfg: TameConfig, log) -> dict:
    """One reward model at reward_model.output, from run.seed."""
    started = time.perf_counter()
    init, pairs, train_pairs, eval_pairs = _pairs(cfg, log)
    out = Path(cfg.reward_model.output)
    with atomic_directory(out) as tmp:
        summary = _train_member(cfg, init, len(pairs), train_pairs, eval_pairs, cfg.run.seed, tmp, str(out), log)
        del summary["margins"]
        summary["seconds"] = time.perf_counter() - started
        (tmp / "reward_model.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"reward model saved to {out} ({summary['seconds']:.1f}s)")
    return summary


def _train_ensemble(cfg: TameConfig, log) -> dict:
    """reward_model.members models at reward_model.output/member-<i>/, seeds run.seed + i, and
    ensemble.json; written whole or not at all."""
    rm_cfg, started = cfg.reward_model, time.perf_counter()
    init, pairs, train_pairs, eval_pairs = _pairs(cfg, log)
    out = Path(rm_cfg.output)
    names = [f"member-{i}" for i in range(rm_cfg.members)]
    seeds = [cfg.run.seed + i for i in range(rm_cfg.members)]
    members: dict[str, dict] = {}
    margins: list[list[float]] = []  # (K, N): each member's held-out margins
    with atomic_directory(out) as tmp:
        for i, (name, seed) in enumerate(zip(names, seeds)):
            log(f"ensemble member {i + 1}/{rm_cfg.members} ({name}, seed {seed})")
            folder = tmp / name
            folder.mkdir()
            summary = _train_member(cfg, init, len(pairs), train_pairs, eval_pairs, seed, folder, str(out / name), log)
            margins.append(summary.pop("margins"))
            summary["seed"] = seed
            (folder / "reward_model.json").write_text(json.dumps(summary, indent=2) + "\n")
            members[name] = summary
        # Mean aggregation: the ensemble prefers `chosen` where the mean of its members' margins
        # r_k(chosen) - r_k(rejected) is positive (the mean of the scores' difference).
        accuracy = {name: m["accuracy"] for name, m in members.items()}
        mean_margins = [sum(column) / len(column) for column in zip(*margins)]  # (N,)
        accuracy["ensemble"] = sum(m > 0 for m in mean_margins) / len(mean_margins)
        manifest = {"members": names, "seeds": seeds, "bootstrap": rm_cfg.bootstrap, "accuracy": accuracy}
        (tmp / ENSEMBLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    seconds = time.perf_counter() - started
    each = ", ".join(f"{name} {a:.3f}" for name, a in accuracy.items() if name != "ensemble")
    log(f"held-out pairwise accuracy: {each}; ensemble (mean) {accuracy['ensemble']:.3f}")
    log(f"reward-model ensemble of {len(names)} saved to {out} ({seconds:.1f}s)")
    return {
        "accuracy": accuracy["ensemble"],
        "output": str(out),
        "members": members,
        "seeds": seeds,
        "bootstrap": rm_cfg.bootstrap,
        "eval_pairs": len(eval_pairs),
        "seconds": seconds,
    }


def _train_member(
    cfg: TameConfig,
    init: str,
    n_pairs: int,
    train_pairs: list[PreferencePair],
    eval_pairs: list[PreferencePair],
    seed: int,
    folder: Path,
    output: str,
    log,
) -> dict:
    """Train one reward model from `init` with `seed`, evaluate it on `eval_pairs`, normalise it
    on the `chosen` responses of `train_pairs` and save it into `folder` (which becomes
    `output`). Returns its summary, with the held-out margins under "margins"."""
    rm_cfg = cfg.reward_model
    device = cfg.learner.device
    started = time.perf_counter()
    torch.manual_seed(seed)  # a fresh score head (causal-LM init) is drawn from it
    # Float32 weights; the forward passes run in learner.compute_dtype (cluster.shared.precision).
    try:
        model, tokenizer = load_reward_model(init, dtype="float32", device=device, init_head=True)
    except UserError as e:
        raise ConfigError(f"{'reward_model.init' if rm_cfg.init else 'model.reward'}: {e}") from None
    encoder = RewardModel(model, tokenizer, cfg.data.chat_template, rm_cfg.max_length)
    pad_id = tokenizer.pad_token_id

    def encode(group: list[PreferencePair]) -> list[tuple[list[int], list[int]]]:
        return [(encoder.encode(p.prompt, p.chosen), encoder.encode(p.prompt, p.rejected)) for p in group]

    train_encoded, eval_encoded = encode(train_pairs), encode(eval_pairs)
    # A bootstrap trains on a resample; normalisation below keeps to the whole training split,
    # so every member of an ensemble is put on the same scale.
    fit_encoded = bootstrap_resample(train_encoded, seed) if rm_cfg.bootstrap else train_encoded
    before = _evaluate(model, pad_id, eval_encoded, rm_cfg.batch_size, device)
    log(f"held-out pairwise accuracy before training: {before['accuracy']:.3f}")

    # -- train: epochs over shuffled batches of pairs ---------------------------------
    optimizer = torch.optim.AdamW(model.parameters(), lr=rm_cfg.learning_rate)
    steps_per_epoch = -(-len(fit_encoded) // rm_cfg.batch_size)
    total_steps = steps_per_epoch * rm_cfg.epochs
    report_every = max(1, total_steps // 10)
    rng = random.Random(seed)
    step, window_loss, window_acc, window = 0, 0.0, 0.0, 0
    for epoch in range(rm_cfg.epochs):
        order = list(fit_encoded)
        rng.shuffle(order)
        model.train()  # dropout is already zeroed; train mode only matters to exotic layers
        for batch in _batches(order, rm_cfg.batch_size):
            chosen, rejected = _pair_scores(model, pad_id, batch, device, cfg.learner.compute_dtype)
            loss, accuracy = pairwise_loss(chosen, rejected)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            step += 1
            window_loss, window_acc, window = window_loss + loss.item(), window_acc + accuracy.item(), window + 1
            if step % report_every == 0 or step == total_steps:
                log(
                    f"epoch {epoch + 1}/{rm_cfg.epochs} step {step}/{total_steps}: "
                    f"loss {window_loss / window:.4f}, batch accuracy {window_acc / window:.3f}"
                )
                window_loss, window_acc, window = 0.0, 0.0, 0
    model.eval()

    # -- evaluate on the held-out pairs -------------------------------------------------
    after = _evaluate(model, pad_id, eval_encoded, rm_cfg.batch_size, device)
    log(f"held-out pairwise accuracy: {after['accuracy']:.3f} (loss {after['loss']:.4f}, {len(eval_pairs)} pairs)")

    # -- normalise: mean score of the training `chosen` responses becomes 0 ---------------
    mean_chosen = _mean_score(model, pad_id, [c for c, _ in train_encoded], rm_cfg.batch_size, device)
    old_bias = model.score.bias.detach().clone() if model.score.bias is not None else torch.zeros(1)
    set_score_bias(model, old_bias.to(model.score.weight.device) - mean_chosen)
    score_bias = float(model.score.bias.item())
    log(
        f"normalised: mean score of the training chosen responses was {mean_chosen:+.4f}; "
        f"score bias now {score_bias:+.4f}"
    )

    # -- save in Hugging Face format --------------------------------------------------------
    save_reward_model(model, tokenizer, folder)
    return {
        "accuracy": after["accuracy"],
        "accuracy_before": before["accuracy"],
        "eval_loss": after["loss"],
        "output": output,
        "pairs": n_pairs,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "steps": step,
        "score_bias": score_bias,
        "normalised_on": "train_chosen",
        **({"bootstrap": True} if rm_cfg.bootstrap else {}),
        "init": str(init),
        "data": str(rm_cfg.data),
        "seconds": time.perf_counter() - started,
        "margins": after["margins"],
    }
