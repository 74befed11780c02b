"""The learner: policy, frozen reference, critic, optimizers; one PPO update per call.

`cluster/` runs `Learner` as a Ray actor (`ray.remote(num_cpus=..., num_gpus=...)`); the
class itself does not need Ray except for the object store in `publish`.

One update, top to bottom (`update`; the records and the experience step are in
`learner/experience.py`, checkpoints in `learner/checkpoints.py`, the math in `learner/ppo.py`):
1. tokens: prompt + response ids of each scored rollout, right-padded; a mask marks the
   response tokens (cut after the first EOS when `ppo.truncate_at_stop`).
2. no-grad passes: the reference log-probs (unless the actors computed them:
   `rollout.reference_logprobs`), the proximal log-probs (the current weights,
   before this update) and the critic's values. When the whole batch is one micro-batch,
   the first epoch's forward pass with gradient is the proximal pass (its detached output),
   so only the reference pass runs without gradient, or none with the actors' reference.
3. rewards: the score at the last response token minus `kl_coef * KL` per token (or the
   score alone, with the KL in the loss: `ppo.kl.placement`); the advantages of
   `ppo.advantage` (`ppo.ADVANTAGE_ESTIMATORS`: GAE with whitening, or the critic-free GRPO,
   RLOO, REINFORCE++); the truncated importance weight min(pi_prox / pi_behaviour, C).
4. PPO epochs over shuffled minibatches, each accumulated over micro-batches: clipped
   surrogate (ratio against the proximal policy, times the IS weight), clipped value loss,
   entropy bonus, PPO-ptx; gradient clipping; AdamW; learning-rate schedule.
5. version += 1 and the KL controller adapts.
6. the new version is published; its handle comes back in the `UpdateResult`, so one call
   both trains and publishes. A NaN or Inf anywhere skips the update: the weights and
   optimizer states are restored and nothing new is published.

Per-token tensors have shape (B, L-1): position t is the prediction of input_ids[:, t+1].
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch

from cluster.shared.config import TameConfig
from cluster.shared.errors import NonFiniteUpdatesError
from cluster.shared.logprobs import response_logprobs
from cluster.shared.lora import adapter_tensors
from cluster.shared.precision import compute_context, torch_dtype
from cluster.shared.records import Rollout, UpdateResult
from cluster.shared.startup import heavy_imports
from cluster.shared.threads import set_torch_threads
from cluster.shared.tokens import pad_token_id
from cluster.shared.transport import ObjectStoreTransport, WeightsHandle, WeightTransport
from learner import checkpoints, lora, ppo
from learner.experience import Batch, Experience, make_experience, tokenize
from learner.loading import export_dtypes, load_models, value_head
from learner.memory import check_device
from learner.rollback import HostSnapshot
from learner.sharding import Rank, Shards, full
from learner.training import optimizers_for, ptx_backward, ptx_examples


class Forward(NamedTuple):
    """One micro-batch's forward pass with gradient, (B, W) each."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None  # None without a critic


class Trained(NamedTuple):
    """What an update that was not skipped did, for its metrics."""

    stats: dict[str, list[float]]
    """Per optimizer step: `accumulate_gradients`' statistics and "grad_norm/<model>"."""
    fused: bool
    """The first epoch's forward pass was the proximal pass."""
    publish_seconds: float


# --------------------------------------------------------------------------- the learner


class Learner:
    """Policy, frozen reference, critic and their optimizers; PPO updates, weight
    publication and checkpoints. See the module docstring for the shape of one update."""

    def __init__(self, cfg: TameConfig, run_dir: str, rank: Rank | None = None):
        with heavy_imports():
            from transformers import AutoTokenizer

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.threads = set_torch_threads(cfg.learner.threads or cfg.learner.num_cpus)
        self.device = torch.device(cfg.learner.device)
        # One of learner.num_workers processes (learner/sharding.py); alone without a rank.
        self.shards = Shards(rank, self.device)
        self.temperature = cfg.rollout.sampling.temperature
        torch.manual_seed(cfg.run.seed)

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = pad_token_id(self.tokenizer)

        # The policy we train, the frozen reference (the SFT model) it is held close to, and
        # the critic (GAE only), each built where it lives: sharded ones are never whole.
        p = cfg.ppo
        if self.device.type == "cuda":  # before anything is loaded: a plan that cannot fit fails now
            check_device(cfg, self.device)
        models = load_models(cfg, self.shards, self.device)
        self.policy, self.reference, self.critic = models.policy, models.reference, models.critic
        self.value_head = value_head(self.critic) if self.critic is not None else None
        self.lora = lora.is_lora(self.policy)  # the policy trains an adapter; its base is the reference

        # The trained models by name (the policy, and the critic with GAE), each with its AdamW
        # and learning-rate schedule under the same name; checkpoints key them "<name>_optimizer"
        # and "<name>_scheduler".
        self.models = {
            name: model for name, model in (("policy", self.policy), ("critic", self.critic)) if model is not None
        }
        self.optimizers, self.schedulers = optimizers_for(self.models, cfg)
        self.kl_controller = (
            ppo.AdaptiveKLController(p.kl.coef, p.kl.target, p.kl.horizon)
            if p.kl.adaptive
            else ppo.FixedKLController(p.kl.coef)
        )
        self.shuffle = torch.Generator().manual_seed(cfg.run.seed)

        self.ptx_examples = ptx_examples(cfg, self.tokenizer)
        self.ptx_cursor = 0

        self.fuse_first_pass = True  # False always runs the separate no-grad pass (tests compare)
        self._version = 0
        self._handle: WeightsHandle | None = None
        self._published = -1  # the version the workers last gathered for a publication
        self.transport: WeightTransport = ObjectStoreTransport()
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.snapshot = HostSnapshot()
        background = cfg.learner.async_checkpoints
        self.checkpoint_writer = checkpoints.Writer(
            self.shards, background=self.device.type == "cuda" if background is None else background
        )
        self.export_dtypes = export_dtypes(cfg)

    # ------------------------------------------------------------------ versions and weights

    def version(self) -> int:
        return self._version

    def place(self) -> dict:
        """The Ray node and the process this worker runs in."""
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def places(self) -> list[dict]:
        """`place` of each worker of the learner, rank 0 first."""
        return [self.place()]

    def publish(self) -> WeightsHandle | None:
        """Publish the current policy weights (with LoRA, the adapter's) with their probes, once
        per version (later calls return the cached handle): `update` does as its last step; the loop calls it for the
        version it starts from. Sharded, every worker gathers each tensor in turn and rank 0
        publishes them; the others return None."""
        if self._published != self._version:
            named = adapter_tensors(self.policy) if self.lora else self.shards.full_parameters(self.policy)
            if self.shards.rank == 0:
                dtype = torch_dtype(self.cfg.learner.transport_dtype or self.cfg.model.dtype)
                self._handle = self.transport.publish(named, self._version, dtype)
            else:
                for _ in named:  # the gathers rank 0 publishes from
                    pass
            self._published = self._version
        return self._handle

    # ------------------------------------------------------------------ tokens and passes

    def tokens(self, rollouts: list[Rollout], truncate: bool | None = None) -> Batch:
        """Step 1: the rollouts as tensors (`experience.tokenize`)."""
        truncate = self.cfg.ppo.truncate_at_stop if truncate is None else truncate
        return tokenize(rollouts, self.pad_id, self.eos_id, truncate, self._version, self.device)

    def _token_logprobs(
        self, model: torch.nn.Module, mb: Batch, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(token) at every window position of `mb` (B, W), and the entropy there."""
        with compute_context(self.device, self.cfg.learner.compute_dtype):
            return response_logprobs(
                model, mb.input_ids, mb.attention_mask, mb.mask, mb.offset, self.temperature, with_entropy
            )

    def _values(self, mb: Batch) -> torch.Tensor:
        """The critic's value of the state before each window token (`loading.token_values`). -> (B, W)"""
        compute = compute_context(self.device, self.cfg.learner.compute_dtype)
        return self.critic.token_values(mb.input_ids, mb.attention_mask, mb.offset, compute)[..., 0] * mb.mask

    def _forward(self, mb: Batch) -> Forward:
        """The policy's log-probs and entropy and the critic's values (None without a
        critic) on a micro-batch, with gradient."""
        logp, entropy = self._token_logprobs(self.policy, mb, with_entropy=True)
        return Forward(logp, entropy, self._values(mb) if self.critic is not None else None)

    @torch.no_grad()
    def _no_grad_passes(
        self, batch: Batch, proximal: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Step 2: the reference log-probs (unless the actors sent them) and, with `proximal`,
        the proximal log-probs and the old values, micro-batch by micro-batch (each cut to its
        own window, then written back at its columns). -> (B, W) each; None for the passes
        not made."""
        given = batch.reference_logprobs
        if given is None and self.reference is None and not self.lora:
            raise ValueError(
                "the rollouts carry no reference log-probs, and this learner holds no reference "
                "model (rollout.reference_logprobs is on: the actors compute them)"
            )
        ref = torch.zeros(batch.mask.shape, device=self.device) if given is None else given
        old_logprobs = torch.zeros_like(ref) if proximal else None
        old_values = torch.zeros_like(ref) if proximal and self.critic is not None else None
        if given is not None and not proximal:
            return ref, None, None
        for rows, stand_in in self.shards.rows(
            torch.arange(len(batch), device=self.device), self.cfg.ppo.micro_batch_size
        ):
            window = batch.window(rows)
            mb, cols = batch.cut(window), window.columns()
            passes = []
            if given is None:  # the reference model, or a LoRA policy with its adapter off
                with lora.as_reference(self.policy, self.reference) as model:
                    passes.append((ref, self._token_logprobs(model, mb)[0]))
            if proximal:
                passes.append((old_logprobs, self._token_logprobs(self.policy, mb)[0]))
                if self.critic is not None:
                    passes.append((old_values, self._values(mb)))
            if not stand_in:
                for out, values in passes:
                    out[rows, cols] = values
        # Each worker wrote its own rows; FSDP keeps a root gathered after a forward.
        self.shards.sum_(None if given is not None else ref, old_logprobs, old_values)
        if given is None and self.reference is not None:
            self.shards.release(self.reference)
        return ref, old_logprobs, old_values

    # ------------------------------------------------------------------ experience

    def prepare(self, rollouts: list[Rollout]) -> tuple[Experience, dict[str, float]]:
        """Steps 1-3 of an update with every no-grad pass: tokens, reference and proximal
        log-probs, old values, then `make_experience`. Returns the experience and the
        rollout/objective metrics."""
        batch = self.tokens(rollouts)
        return self._experience(batch, *self._no_grad_passes(batch))

    def _experience(
        self, batch: Batch, ref_logprobs: torch.Tensor, old_logprobs: torch.Tensor, old_values: torch.Tensor | None
    ) -> tuple[Experience, dict[str, float]]:
        """Step 3 (`experience.make_experience`) at the KL controller's coefficient now."""
        return make_experience(
            batch, ref_logprobs, old_logprobs, old_values, self.cfg.ppo, self.kl_controller.value, self.eos_id
        )

    # ------------------------------------------------------------------ gradients

    def accumulate_gradients(
        self, exp: Experience, rows: torch.Tensor, micro_batch_size: int, first: Forward | None = None
    ) -> dict[str, float]:
        """Forward and backward the PPO loss of the minibatch `rows`, micro-batch by
        micro-batch; gradients add up in .grad. Every term is a token sum over a count of
        the whole minibatch (its tokens, or sequences for `ppo.loss_aggregation`), so the
        result does not depend on `micro_batch_size`. `first`, when given, is the forward
        pass already made on exp.select(rows) as one micro-batch (the fused first epoch)."""
        p = self.cfg.ppo
        n_tokens = float(exp.mask[rows].sum())
        kl_coef = self.kl_controller.value if p.kl.placement == "loss" else 0.0
        totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        for micro, stand_in in self.shards.rows(rows, micro_batch_size):
            mb = exp.select(micro)
            if first is not None:
                assert len(micro) == len(rows), "a fused forward covers exactly one micro-batch"
            # The policy's terms, then the critic's, each with its own backward: their
            # parameters are apart, so the gradients are the summed loss's, and the critic's
            # activations are never held beside the policy's.
            logp, entropy = (
                (first.logprobs, first.entropy)
                if first is not None
                else self._token_logprobs(self.policy, mb.batch, with_entropy=True)
            )
            weights = ppo.token_weights(
                mb.mask, p.loss_aggregation, len(rows), n_tokens, self.cfg.rollout.sampling.max_new_tokens
            )
            pg = ppo.clipped_policy_loss(
                logp,
                mb.old_logprobs,
                mb.advantages,
                mb.mask,
                p.clip_ratio,
                weights=mb.is_weights,
                normaliser=n_tokens,
                aggregation=weights,
            )
            if p.entropy_coef == 0:
                entropy = entropy.detach()
            ent = ppo.entropy_bonus(entropy, mb.mask, normaliser=n_tokens)
            policy_loss = loss = pg.loss - p.entropy_coef * ent
            terms = [
                ("policy", pg.loss),
                ("clipfrac", pg.clipfrac),
                ("approxkl", pg.approxkl),
                ("ratio", pg.ratio),
                ("entropy", ent),
            ]
            kl = None
            if kl_coef > 0:  # GRPO's placement: k3 toward the reference, in the loss
                kl = (ppo.kl_k3(logp, mb.ref_logprobs) * weights).sum()
                policy_loss = policy_loss + kl_coef * kl
            # A stand-in pass is there for the gathers only: no gradient, and zero statistics
            # under the same keys as every worker's.
            (0.0 * policy_loss if stand_in else policy_loss).backward()
            if self.critic is not None:
                values = first.values if first is not None else self._values(mb.batch)
                vf = ppo.clipped_value_loss(
                    values, mb.old_values, mb.returns, mb.mask, p.value_clip, normaliser=n_tokens
                )
                value_loss = p.vf_coef * vf.loss
                (0.0 * value_loss if stand_in else value_loss).backward()
                loss = loss + value_loss
                terms += [("value", vf.loss), ("vf_clipfrac", vf.clipfrac)]
            if kl is not None:
                loss = loss + kl_coef * kl
                terms.append(("kl", kl))
            for key, value in [("loss", loss), *terms]:
                totals[key] += torch.zeros_like(value) if stand_in else value.detach()
        if p.ptx_coef > 0:
            totals["ptx"] = self._ptx_backward(len(rows), micro_batch_size)
            totals["loss"] += p.ptx_coef * totals["ptx"]
        return self.shards.sum_floats(totals)

    def _ptx_backward(self, n_examples: int, micro_batch_size: int) -> torch.Tensor:
        """PPO-ptx (InstructGPT) on the next `n_examples` demonstrations, cycling through the
        ptx data (`training.ptx_backward`)."""
        batch = [self.ptx_examples[(self.ptx_cursor + i) % len(self.ptx_examples)] for i in range(n_examples)]
        self.ptx_cursor = (self.ptx_cursor + n_examples) % len(self.ptx_examples)
        return ptx_backward(self.policy, batch, self.shards, micro_batch_size, self.pad_id, self.cfg)

    # ------------------------------------------------------------------ the update

    def update(self, rollouts: list[Rollout]) -> UpdateResult:
        """One PPO update on scored rollouts; its last step publishes the new version, whose
        handle the result carries. A NaN or Inf anywhere skips the update: the version does not
        move and nothing is published."""
        started = time.perf_counter()
        p = self.cfg.ppo

        # 1. tokens
        batch = self.tokens(rollouts)
        first_order = torch.randperm(len(batch), generator=self.shuffle).to(self.device)

        # 2. no-grad passes. One micro-batch per update: the first epoch's forward pass, made
        # now with gradient, is the proximal policy (Hilton et al.'s pi_prox is the policy
        # before this update's first step), so its no-grad twin is skipped.
        fused = (
            self.fuse_first_pass and not self.shards.sharded and len(batch) <= min(p.minibatch_size, p.micro_batch_size)
        )
        ref_logprobs, old_logprobs, old_values = self._no_grad_passes(batch, proximal=not fused)
        first = self._forward(batch.select(first_order)) if fused else None
        if first is not None:
            old_logprobs, old_values = proximal_from(batch, first_order, first)

        # 3. rewards and advantages
        exp, metrics = self._experience(batch, ref_logprobs, old_logprobs, old_values)
        if ppo.any_nonfinite(exp.rewards, exp.advantages, exp.returns):
            return self._skip(metrics, started)

        # 4. PPO epochs over shuffled minibatches
        stats = self._epochs(exp, first_order, first)
        if stats is None:
            return self._skip(metrics, started)

        # 5. a new version; the KL controller sees this batch's KL per sequence
        self._version += 1
        self.nonfinite_in_row = 0
        self.kl_controller.update(metrics["objective/kl"], len(exp))

        # 6. publish it: the handle goes back with the result, for the actors to load
        publishing = time.perf_counter()
        weights = self.publish()
        trained = Trained(stats, fused, time.perf_counter() - publishing)
        return UpdateResult(
            self._version, skipped=False, metrics=self._metrics(metrics, started, trained), weights=weights
        )

    def _epochs(
        self, exp: Experience, first_order: torch.Tensor, first: Forward | None
    ) -> dict[str, list[float]] | None:
        """Step 4: `ppo.epochs` passes over shuffled minibatches (the first epoch in
        `first_order`, over `first` when the first pass was fused), one clipped optimizer step
        each. Returns each step's statistics (`Trained.stats`), or None when a minibatch's loss
        or gradient norm was not finite: then no step of this update is left applied."""
        p = self.cfg.ppo
        steps = p.epochs * math.ceil(len(exp) / p.minibatch_size)
        if steps > 1:  # a later minibatch may turn non-finite after earlier ones stepped
            self.snapshot.take(self.models, self.optimizers, self.schedulers)
        ptx_cursor = self.ptx_cursor
        stats: dict[str, list[float]] = defaultdict(list)
        for epoch in range(p.epochs):
            order = first_order if epoch == 0 else torch.randperm(len(exp), generator=self.shuffle).to(self.device)
            for rows in order.split(p.minibatch_size):
                step = self.accumulate_gradients(exp, rows, p.micro_batch_size, first=first if epoch == 0 else None)
                norms = {
                    name: float(full(torch.nn.utils.clip_grad_norm_(model.parameters(), p.max_grad_norm)))
                    for name, model in self.models.items()
                }
                if not all(math.isfinite(x) for x in (step["loss"], *norms.values())):
                    self._zero_grad()
                    if steps > 1:
                        self.snapshot.restore(self.models, self.optimizers, self.schedulers)
                    self.ptx_cursor = ptx_cursor
                    return None
                for name, optimizer in self.optimizers.items():
                    optimizer.step()
                    self.schedulers[name].step()
                self._zero_grad()
                for key, value in [*step.items(), *((f"grad_norm/{n}", v) for n, v in norms.items())]:
                    stats[key].append(value)
        return stats

    def _skip(self, metrics: dict[str, float], started: float) -> UpdateResult:
        """Account for an update skipped for NaN or Inf; raise after too many in a row."""
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        limit = self.cfg.learner.max_nonfinite_updates
        if self.nonfinite_in_row >= limit:
            raise NonFiniteUpdatesError(
                f"{self.nonfinite_in_row} updates in a row had NaN or Inf in their rewards, "
                f"advantages, losses or gradients (learner.max_nonfinite_updates = {limit}); "
                f"the last good policy version is {self._version}. Check the reward function "
                "and lower ppo.learning_rate."
            )
        return UpdateResult(self._version, skipped=True, metrics=self._metrics(metrics, started))

    def _metrics(
        self, experience: dict[str, float], started: float, trained: Trained | None = None
    ) -> dict[str, float]:
        """An update's metrics: the batch's (`experience_metrics`), the learner's counters, and
        with `trained` (None for a skipped update) the training's (`training_metrics`)."""
        metrics = {
            **experience,
            "learner/version": float(self._version),
            "learner/lr": self.schedulers["policy"].get_last_lr()[0],
            "learner/skipped_nonfinite": float(trained is None),
            "learner/nonfinite_total": float(self.nonfinite_total),
        }
        if trained is not None:
            metrics.update(training_metrics(trained.stats))
            metrics.update(
                {
                    # Policy and critic (none without GAE): what the learner holds and trains.
                    "learner/trained_parameters": float(
                        sum(p.numel() for model in self.models.values() for p in model.parameters() if p.requires_grad)
                    ),
                    "learner/workers": float(self.shards.world),
                    "learner/fused_first_pass": float(trained.fused),
                    "perf/publish_seconds": trained.publish_seconds,
                }
            )
            if "critic" in self.schedulers:
                metrics["learner/critic_lr"] = self.schedulers["critic"].get_last_lr()[0]
        metrics["perf/update_seconds"] = time.perf_counter() - started  # publication included
        return metrics

    def _zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def _checkpointed_optimizers(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        """{"<model>_optimizer": (model, its optimizer)}, as the checkpoints key them."""
        return {f"{name}_optimizer": (self.models[name], optimizer) for name, optimizer in self.optimizers.items()}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def logprobs(self, rollouts: list[Rollout]) -> list[list[float]]:
        """The learner's log-probs (at the sampling temperature) of every response token."""
        batch = self.tokens(rollouts, truncate=False)
        logprobs = torch.zeros(batch.mask.shape, device=self.device)
        for rows, stand_in in self.shards.rows(
            torch.arange(len(batch), device=self.device), self.cfg.ppo.micro_batch_size
        ):
            window = batch.window(rows)
            logp, _ = self._token_logprobs(self.policy, batch.cut(window))
            if not stand_in:
                logprobs[rows, window.columns()] = logp
        self.shards.sum_(logprobs)
        self.shards.release(self.policy)
        return [logprobs[row][batch.mask[row].bool()].tolist() for row in range(len(batch))]

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, driver_state: dict) -> str:
        """Write this version's checkpoint (`learner/checkpoints.py`) with the driver's state,
        then keep only the newest `learner.keep_checkpoints`. Returns its path; with
        `learner.async_checkpoints` it is complete there once `wait_for_checkpoint` returns."""
        state = checkpoints.trainer_state(self, driver_state)
        path, keep = checkpoints.path_of(self.run_dir, self._version), self.cfg.learner.keep_checkpoints
        optimizers = self._checkpointed_optimizers()
        return self.checkpoint_writer.save(
            path, self.models, optimizers, self.tokenizer, state, keep, self.export_dtypes
        )

    def wait_for_checkpoint(self) -> str | None:
        """Wait until the checkpoint being written in the background is complete; raise if its
        writing failed. Returns the newest checkpoint this learner saved (None before any)."""
        return self.checkpoint_writer.wait()

    def load_checkpoint(self, path: str | None = None) -> dict | None:
        """Restore weights, optimizers, schedulers, KL controller, version and RNG states
        from `path`, or from the newest complete checkpoint of the run when None. Returns
        the driver's state saved with it, or None when there is no checkpoint."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        self.checkpoint_writer.wait()  # the save in flight may be the newest checkpoint: complete first
        if path is None:  # rank 0 picks it, so that every worker loads the same one
            found = checkpoints.complete(self.run_dir) if self.shards.rank == 0 else []
            path = self.shards.broadcast(str(found[-1]) if found else None)
            if path is None:
                return None
        auto = {"policy": AutoModelForCausalLM, "critic": AutoModelForSequenceClassification}
        models = {name: (model, auto[name]) for name, model in self.models.items()}
        state = checkpoints.load(Path(path), models, self._checkpointed_optimizers(), self.shards)
        checkpoints.restore_trainer_state(self, state)
        self._handle, self._published = None, -1
        return state["extra"]


def proximal_from(batch: Batch, rows: torch.Tensor, first: Forward) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The proximal log-probs and old values (None without a critic), (B, W) each, from the
    first forward pass of an update (`first`, made on batch.select(rows) before any optimizer
    step): the numbers the no-grad pass would compute, without a second pass."""
    cols = batch.window(rows).columns()
    old_logprobs = torch.zeros(batch.mask.shape, device=first.logprobs.device)
    old_logprobs[rows, cols] = first.logprobs.detach()
    old_values = None
    if first.values is not None:
        old_values = torch.zeros_like(old_logprobs)
        old_values[rows, cols] = first.values.detach()
    return old_logprobs, old_values


def training_metrics(stats: dict[str, list[float]]) -> dict[str, float]:
    """The PPO epochs' metrics (TRL's names) from each optimizer step's statistics
    (`Trained.stats`): their means, and the first step's ratio."""
    avg = {key: sum(values) / len(values) for key, values in stats.items()}
    metrics = {
        "policy/approxkl_avg": avg["approxkl"],
        "policy/clipfrac_avg": avg["clipfrac"],
        "policy/entropy_avg": avg["entropy"],
        "policy/grad_norm_avg": avg["grad_norm/policy"],
        "loss/policy_avg": avg["policy"],
        "loss/total_avg": avg["loss"],
        "val/ratio": avg["ratio"],
        # 1 up to rounding: before the first step pi is the proximal policy.
        "val/ratio_first": stats["ratio"][0],
        "learner/optimizer_steps": float(len(stats["loss"])),
    }
    # The critic's terms (GAE), the KL in the loss and PPO-ptx, where the update has them.
    optional = {
        "value": "loss/value_avg",
        "vf_clipfrac": "val/clipfrac_avg",
        "grad_norm/critic": "val/grad_norm_avg",
        "kl": "loss/kl_avg",
        "ptx": "loss/ptx_avg",
    }
    metrics.update({name: avg[key] for key, name in optional.items() if key in avg})
    return metrics
