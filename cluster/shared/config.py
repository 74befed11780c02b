"""One validated config tree for every stage of tame: the schema.

Validated by pydantic with ``extra="forbid"`` so a typo is an error, a docstring on every
field (`tame config schema`), frozen after parsing, and dumped whole into the run directory.
`cluster.shared.config_file.load_config` reads it from YAML with ``--set dotted.key=value``
overrides. The roles (actors, learner, reward service) share it without importing each other.
The sections of stages 1 and 2 are in `cluster.shared.config_stages`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from cluster.shared.config_reward import EnsembleConfig, RewardFunctionConfig
from cluster.shared.config_scaling import MAX_ACTORS, AutoscaleConfig, AutoscalingConfig
from cluster.shared.config_stages import RewardModelTrainConfig, Section, SFTConfig

# --------------------------------------------------------------------------- run / models


class RunConfig(Section):
    name: str = Field("tame", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Run name: the run directory is `<output_dir>/<name>/` and the wandb run is named after it."""
    output_dir: str = "runs"
    """Folder that holds one directory per run."""
    seed: int = Field(0, ge=0)
    """Seed for every random choice of the run (data order, sampling, initialisation)."""


class ModelConfig(Section):
    policy: str = "runs/assets/small/policy"
    """Path of the policy (a Hugging Face causal LM folder): the SFT model that PPO starts from."""
    reward: str | None = "runs/assets/small/reward"
    """Path of the reward model (a Hugging Face sequence-classification folder, or an ensemble
    folder with ensemble.json, as `tame train-rm` writes), or null for rule-based rewards only."""
    build_assets: Literal["tiny", "small", "base"] | None = None
    """When set and the model paths do not exist, build the offline assets of this size there first (`tame assets`)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype of the rollout engines, and of the weights sent to them unless
    learner.transport_dtype says otherwise. The learner always keeps float32 weights and
    optimizer states (learner.compute_dtype sets its arithmetic). CPU runs use float32."""


# --------------------------------------------------------------------------- data


class DataConfig(Section):
    prompts: str = "runs/assets/small/data/prompts.jsonl"
    """JSONL of prompts, one object a line: {"prompt": str} or {"messages": [{"role", "content"}, ...]}."""
    shuffle: bool = True
    """Reshuffle the prompt order at every epoch (from the run seed and the epoch number)."""
    chat_template: bool = True
    """Format prompts with the tokenizer's chat template; false sends the raw text (base models)."""
    max_prompt_tokens: int = Field(256, ge=1)
    """Prompts longer than this (in tokens, after the template), or leaving no room for a response
    within rollout.max_model_len, are rejected before a run starts (exit 2, naming file and line)."""


# --------------------------------------------------------------------------- rollout


class SamplingConfig(Section):
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    """Sampling temperature. The learner computes log-probs at the same temperature."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass. Values below 1 make behaviour log-probs differ from the full softmax."""
    top_k: int = Field(-1, ge=-1)
    """Top-k sampling; -1 disables it."""
    max_new_tokens: int = Field(48, ge=1, le=32768)
    """Most tokens generated per response; longer responses end with finish reason 'length'."""
    samples_per_prompt: int = Field(1, ge=1, le=64)
    """Completions sampled for each prompt."""
    stop: list[str] = Field(default_factory=list)
    """Extra stop strings (the tokenizer's EOS token always stops)."""


class RolloutConfig(Section):
    num_actors: int = Field(1, ge=1, le=MAX_ACTORS)
    """Number of rollout actors (vLLM engines) at start; `tame scale` changes it while a job runs."""
    autoscale: AutoscaleConfig | None = None
    """Size the pool from what the run measures, between min_actors and max_actors
    (`cluster.autoscale`); null keeps rollout.num_actors until `tame scale` changes it. A
    `tame scale` during the run turns it off: the user's size holds from then on."""
    num_cpus: float = Field(1.0, gt=0.0)
    """Ray CPUs reserved per actor."""
    threads: int | None = Field(None, ge=1, le=1024)
    """Threads each engine computes with; null: as many as it reserved (num_cpus, at least 1).
    More than reserved suits max_staleness 0 on a small machine, where actors and learner take
    turns (docs/performance.md, "Threads")."""
    num_gpus: float = Field(0.0, ge=0.0)
    """Ray GPUs per actor: 1 on a GPU cluster, so each engine gets its own device, or a share
    of one (0.5: two engines per GPU). One engine spans at most one GPU: tame has no tensor
    parallelism yet."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per actor, to pin the actors to some nodes (e.g. {"rollout_node": 1})."""
    max_model_len: int = Field(512, ge=16)
    """Longest prompt plus response, in tokens, that an engine accepts."""
    kv_cache_gib: float = Field(1.0, gt=0.0, le=1024.0)
    """KV-cache size per engine in GiB on CPU (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=0.95)
    """Share of a GPU's memory an engine may take (GPU only). Engines packed on one GPU
    (num_gpus < 1) may take at most 0.95 of it together."""
    enforce_eager: bool | None = None
    """Run the engine eagerly, without CUDA graphs; null: eager on CPU only (CUDA graphs on
    GPUs survive weight reloads, which are made in place)."""
    prompts_per_batch: int = Field(32, ge=1)
    """Most prompts an actor holds in flight at once: it starts more as these end, so its
    engine stays full (continuous generation, docs/continuous.md)."""
    inflight_updates: Literal["keep", "recompute", "drain"] = "keep"
    """What an actor holding prompts does when a newer policy version is published. `keep`:
    it loads the version between two engine steps and the responses in flight go on, their
    next tokens attending to keys and values the old weights computed; `recompute`: it loads
    it and recomputes those keys and values with the new weights first; `drain`: it starts no
    more prompts until those in flight end, then loads, so each response is one version's.
    Every token's behaviour log-prob is recorded either way (docs/continuous.md). With LoRA a
    request keeps the adapter it started with, so keep and recompute are the same."""
    generate_timeout_s: float | None = Field(900.0, gt=0.0)
    """How long one generation call may take: an actor steps its engine until some of its
    prompts end or a quarter second has passed (then finishes the step), scores those that
    ended and answers, with their reference log-probs under reference_logprobs. An actor that
    has not answered by then is taken as hung and handled as a dead one: its prompts are
    handed out again and it is replaced (`generate_timeouts` in the summary). Null: no limit."""
    load_timeout_s: float = Field(300.0, gt=0.0)
    """How long an actor that is up may take to load and verify a new policy version; one that
    has not confirmed by then is taken as hung: it is retired, replaced, and counted
    (`load_timeouts` in the summary)."""
    replace_failed: bool = True
    """A rollout actor that dies is replaced by a new one, which loads the current weights
    before it produces. False carries on with the actors left (the run fails when none is)."""
    sampling: SamplingConfig = SamplingConfig()
    """Sampling parameters shared by all actors."""
    reference_logprobs: bool = False
    """Each actor holds a copy of the frozen reference model (the SFT model at model.policy)
    and computes the reference log-probs of its rollouts while the reward service scores
    them; the learner then holds no reference model and skips its reference pass. It moves
    a forward pass per sample off the learner, the slower role in most runs, and overlaps
    it with scoring. Costs each actor the reference's memory: on a GPU it must fit beside
    the engine's gpu_memory_utilization share. See docs/gpus.md."""

    @model_validator(mode="after")
    def _start_within_the_bounds(self) -> RolloutConfig:
        scale = self.autoscale
        if scale is not None and not scale.min_actors <= self.num_actors <= scale.max_actors:
            raise ValueError(
                f"rollout.num_actors ({self.num_actors}), the pool's size at start, is outside "
                f"rollout.autoscale's [{scale.min_actors}, {scale.max_actors}]"
            )
        return self

    @field_validator("num_gpus")
    @classmethod
    def _one_gpu_per_engine(cls, value: float) -> float:
        if value > 1:
            raise ValueError(
                f"{value} GPUs per engine: one engine spans at most one GPU, as tame has no "
                "tensor parallelism yet; run more actors instead"
            )
        return value


# --------------------------------------------------------------------------- reward


class RewardConfig(Section):
    model_weight: float = 1.0
    """Weight of the reward model's score in the summed reward (ignored when model.reward is null)."""
    functions: list[RewardFunctionConfig] = Field(default_factory=list)
    """Rule-based rewards added to the model's score, each with its weight."""
    ensemble: EnsembleConfig = EnsembleConfig()
    """How the members of a reward-model ensemble are aggregated (docs/reward-ensembles.md)."""
    replicas: int = Field(1, ge=1, le=256)
    """Serve replicas of the reward deployment (ignored when autoscaling is set)."""
    autoscaling: AutoscalingConfig | None = None
    """Serve autoscaling settings, passed through; null means a fixed replica count."""
    num_cpus: float = Field(1.0, ge=0.0)
    """Ray CPUs reserved per replica."""
    threads: int | None = Field(None, ge=1, le=1024)
    """Torch threads of each replica; null: as many as it reserved (num_cpus, at least 1)."""
    num_gpus: float = Field(0.0, ge=0.0)
    """Ray GPUs per replica."""
    max_batch_size: int = Field(64, ge=1)
    """Most (prompt, response) items scored in one forward pass (serve.batch)."""
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    """How long a replica waits to fill a batch."""
    max_items: int = Field(256, ge=1)
    """Most items accepted in one request."""
    max_chars: int = Field(16384, ge=1)
    """Longest prompt or response string accepted, in characters."""
    max_length: int = Field(512, ge=8)
    """Tokens fed to the reward model per item; longer inputs keep their last tokens."""
    timeout_s: float = Field(60.0, gt=0.0)
    """Time budget of one scoring call from a rollout actor, retries included, before
    call_items_per_s adds the part that grows with its batch. Each attempt gets an equal share
    of what is left, so one stuck on a dead replica leaves time to retry: keep timeout_s /
    (retries + 1) above what a healthy call takes whatever its size (routing, a replica's
    queue, the batch wait)."""
    retries: int = Field(3, ge=0, le=100)
    """Retries of a failed scoring call within the time budget."""
    call_items_per_s: float | None = Field(None, gt=0.0)
    """Slowest rate, in items a second, at which a healthy reward service gets through one
    scoring call when every rollout actor calls at once (right after each new policy version):
    its items a second under load over the most actors the pool will have (rollout.num_actors, the
    most `tame scale` will set, or rollout.autoscale.max_actors),
    since a call waits for the others' items too. A call of n items then gets a budget of
    timeout_s + (retries + 1) x n / call_items_per_s, each attempt an equal share of what is
    left: the first waits n / call_items_per_s beyond its share of timeout_s, so a call slowed
    by the burst is not cancelled and sent again, while one stuck on a dead replica still gives
    up with time left to retry. Null: timeout_s whatever the batch. The grown budget counts
    toward rollout.generate_timeout_s."""
    failing_timeout_s: float = Field(600.0, gt=0.0)
    """How long generation calls may come back with nothing scored, their times added up, with
    none scored in between (a reward service that stays down, a rule function that fails on
    the same prompts each time), before the run ends: exit 1, its prompts kept for `--resume`."""
    host: str = "127.0.0.1"
    """HTTP bind address of the reward service."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of the reward service."""
    token_env: str = "TAME_REWARD_TOKEN"
    """Environment variable holding the bearer token; when it is set, HTTP requests must carry it."""


# --------------------------------------------------------------------------- learner / PPO


class KLConfig(Section):
    coef: float = Field(0.05, ge=0.0)
    """Initial KL coefficient beta of the per-token penalty toward the reference (SFT) model."""
    adaptive: bool = False
    """Adapt beta toward `target` (Ziegler et al. 2019); false keeps it fixed."""
    target: float = Field(6.0, gt=0.0)
    """Target KL per sequence (nats) of the adaptive controller."""
    horizon: int = Field(10000, ge=1)
    """Horizon (samples) of the adaptive controller."""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator of the reward penalty (Schulman's k1, k2, k3). In the loss
    (`placement: loss`) the estimator is always k3, as GRPO's."""
    placement: Literal["reward", "loss"] = "reward"
    """Where the KL penalty goes: `reward` shapes each token's reward (InstructGPT); `loss`
    adds coef * k3(pi, pi_ref) per token to the policy loss (GRPO). Works with every estimator."""


class PPOConfig(Section):
    epochs: int = Field(1, ge=1, le=100)
    """PPO epochs over each batch of rollouts."""
    minibatch_size: int = Field(16, ge=1)
    """Sequences per optimizer step."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward pass; gradients accumulate up to the minibatch."""
    learning_rate: float = Field(1e-5, gt=0.0, le=1.0)
    """Policy learning rate (AdamW)."""
    critic_learning_rate: float = Field(1e-5, gt=0.0, le=1.0)
    """Critic learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up, in optimizer steps."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay after warm-up, over the run's optimizer steps."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    """Gradient-norm clip."""
    clip_ratio: float = Field(0.2, gt=0.0, le=10.0)
    """PPO ratio clip epsilon."""
    value_clip: float = Field(0.2, gt=0.0)
    """Clip range of the value prediction around its old value."""
    vf_coef: float = Field(0.1, ge=0.0)
    """Weight of the value loss."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus."""
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """Advantage estimator: `gae` (PPO with a learned critic), or critic-free: `grpo` (group
    mean and std), `rloo` (leave-one-out group mean), `reinforce_pp` (REINFORCE++: returns
    normalised over the batch). Without `gae` no critic is loaded or trained."""
    grpo_scale_by_std: bool = True
    """GRPO divides by the group's reward std; false is Dr. GRPO's unbiased variant."""
    loss_aggregation: Literal["token_mean", "sequence_mean", "token_sum_norm"] = "token_mean"
    """How the policy loss sums its tokens over a minibatch: the mean over its tokens; the
    mean over sequences of each one's token mean; or the token sum over sequences x
    rollout.sampling.max_new_tokens (Dr. GRPO: no length bias)."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """Discount factor of GAE and of REINFORCE++'s returns."""
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0)
    """Lambda of GAE."""
    whiten_advantages: bool = True
    """Whiten GAE's advantages over the batch's response tokens (GRPO divides by the group
    std, REINFORCE++ whitens its returns; RLOO and Dr. GRPO are not normalised)."""
    whiten_rewards: bool = False
    """Whiten the scores over the batch before shaping."""
    is_cap: float = Field(2.0, ge=1.0)
    """C of the truncated importance weight min(pi_prox / pi_behaviour, C) for off-policy rollouts."""
    missing_eos_penalty: float | None = None
    """If set, subtract this from the score of responses that did not end with EOS."""
    truncate_at_stop: bool = True
    """Ignore tokens after the first stop token of a response."""
    ptx_coef: float = Field(0.0, ge=0.0)
    """Weight of the pretraining log-likelihood term (PPO-ptx); 0 disables it."""
    ptx_data: str | None = None
    """JSONL of {"prompt", "response"} for PPO-ptx."""
    kl: KLConfig = KLConfig()
    """KL penalty toward the reference model."""

    @model_validator(mode="after")
    def _micro_divides_minibatch(self) -> PPOConfig:
        if self.minibatch_size % self.micro_batch_size:
            raise ValueError(
                f"ppo.micro_batch_size ({self.micro_batch_size}) must divide ppo.minibatch_size ({self.minibatch_size})"
            )
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("ppo.ptx_coef > 0 needs ppo.ptx_data")
        return self


class LoRAConfig(Section):
    """Train a low-rank adapter (peft's LoRA) on the frozen policy instead of every weight."""

    rank: int = Field(8, gt=0, le=512)
    """r: the rank of each adapter's A (r x in) and B (out x r)."""
    alpha: float = Field(16.0, gt=0.0)
    """The adapter's output is scaled by alpha / rank. vLLM folds that scale into B in the
    engine's dtype, so below float32 it must be a power of two (exact) for a load to be
    verified."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names (their last part, e.g. q_proj, v_proj) that get an adapter; all-linear:
    every linear layer of the decoder (not the LM head)."""


class LearnerConfig(Section):
    device: Literal["cpu", "cuda"] = "cpu"
    """Torch device of the learner: cpu, or cuda (the GPU Ray gives it: learner.num_gpus >= 1)."""
    compute_dtype: str = "float32"
    """Arithmetic of the learner's forward and backward passes: float32, or bfloat16 under
    autocast (weights and optimizer states stay float32, value and score heads compute in
    float32). Also used by `tame sft` and `tame train-rm`."""
    num_cpus: float = Field(1.0, gt=0.0)
    """Ray CPUs reserved for the learner actor."""
    threads: int | None = Field(None, ge=1, le=1024)
    """Torch threads of the learner; null: as many as it reserved (num_cpus, at least 1). Its
    threads wait passively at barriers, so more threads than reserved borrow the cores the
    actors leave idle without slowing them (docs/performance.md, "Threads")."""
    num_gpus: float = Field(0.0, ge=0.0)
    """Ray GPUs of the learner actor."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources of the learner, to pin it to a node (e.g. {"learner_node": 1})."""
    critic: Literal["reward", "policy"] = "reward"
    """Initialise the critic from the reward model (InstructGPT) or from the policy with a fresh value head."""
    transport_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Cast the weights to this dtype for the broadcast; null keeps model.dtype. The engines
    must hold what is sent exactly, for the sync to be verified: model.dtype itself, or a
    16-bit dtype into float32 engines."""
    checkpoint_every: int = Field(10, ge=1)
    """Write a checkpoint every this many updates (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Keep the newest K checkpoints."""
    async_checkpoints: bool | None = None
    """Write checkpoints in the background: training waits only while the weights and optimizer
    states are copied to host memory and the export is gathered, not for the files. Null: on
    with learner.device cuda; off on cpu, where the copy takes the host memory the learner
    trains in and the writing takes the cores it trains on."""
    max_nonfinite_updates: int = Field(3, ge=1)
    """Stop the run after this many consecutive updates skipped for NaN or Inf."""
    update_timeout_s: float | None = Field(None, gt=0.0)
    """End the run (exit 1, naming the newest checkpoint) when one update takes longer than
    this: a hung device or collective. Null: no limit."""
    num_workers: int = Field(1, ge=1, le=4096)
    """Processes of the one logical learner. Above 1, FSDP2 shards the policy, reference,
    critic and optimizer states over them (a torch.distributed group: gloo on CPU, NCCL on
    GPU), each worker with the num_cpus, num_gpus and resources above, placed together with
    a Ray placement group. Sharded checkpoints resume with any number of workers."""
    param_dtype: Literal["float32", "bfloat16"] | None = None
    """FSDP2 mixed precision of a sharded learner: the dtype its layers gather and compute in
    (float32 master weights and optimizer states stay). Null: float32."""
    reduce_dtype: Literal["float32", "bfloat16"] | None = None
    """FSDP2 mixed precision of a sharded learner: the dtype gradients are summed in across
    workers. Null: as param_dtype."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping
    them: less memory for a long sequence, about a third more compute."""
    lora: LoRAConfig | None = None
    """Train a LoRA adapter on the policy (docs/lora.md): its base weights frozen in
    learner.compute_dtype, the adapter and its optimizer states float32, the reference the
    same model with the adapter off, and only the adapter sent to the actors. Null: train
    every weight. The critic (GAE) stays a full model."""

    @field_validator("compute_dtype")
    @classmethod
    def _trainable_dtype(cls, value: str) -> str:
        if value == "float16":
            raise ValueError("float16 needs a gradient scaler, which tame does not have: use bfloat16")
        if value not in ("float32", "bfloat16"):
            raise ValueError(f"expected float32 or bfloat16, got {value!r}")
        return value

    @model_validator(mode="after")
    def _gpu_when_cuda(self) -> LearnerConfig:
        if self.device == "cuda" and self.num_gpus < 1:
            raise ValueError(
                f"learner.device cuda needs learner.num_gpus >= 1 (got {self.num_gpus}): "
                "Ray gives the learner its GPU and hides the others"
            )
        if self.lora is not None and self.num_workers > 1:
            raise ValueError(
                "learner.lora trains on one learner worker: the adapter and its optimizer states are a "
                "few MB that sharding would not save, and a sharded frozen base is not built yet. "
                "Set learner.num_workers 1"
            )
        if self.num_workers == 1 and (self.param_dtype or self.reduce_dtype):
            raise ValueError(
                "learner.param_dtype and learner.reduce_dtype are the mixed precision of a "
                "sharded learner (learner.num_workers >= 2); one worker computes in "
                "learner.compute_dtype"
            )
        return self


# --------------------------------------------------------------------------- loop


class TrainConfig(Section):
    total_updates: int = Field(20, ge=1)
    """Learner updates (policy versions) to run."""
    total_samples: int | None = Field(None, ge=1)
    """Stop after this many trained samples instead, if reached first."""
    rollout_batch_size: int = Field(32, ge=1)
    """Completions per learner update."""
    max_staleness: int = Field(0, ge=0)
    """Largest allowed learner version minus record version: 0 is synchronous on-policy PPO."""
    queue_size: int = Field(4, ge=1)
    """Bound of the experience queue, in generation batches (`rollout.prompts_per_batch`
    prompts); never below one learner batch."""


class WandbConfig(Section):
    mode: Literal["online", "offline", "disabled", "auto"] = "auto"
    """online, offline or disabled; auto is online when an API key is set, else offline."""
    project: str = "tame"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user)."""
    tags: list[str] = Field(default_factory=list)
    """wandb tags."""


class LoggingConfig(Section):
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases settings."""
    sample_every: int = Field(5, ge=1)
    """Log a table of sample completions every this many updates."""
    samples_in_table: int = Field(8, ge=1)
    """Rows of the sample table."""


class ClusterConfig(Section):
    address: str | None = None
    """Ray address to connect to; null uses RAY_ADDRESS or starts a local Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local Ray started by tame (null: all of the machine's)."""
    check_resources: bool = True
    """Before starting, check that the cluster can hold every role's resources, and fail
    (exit 2) if not; false for a cluster that adds nodes when asked (an autoscaler)."""
    start_timeout_s: float = Field(600.0, gt=0.0)
    """How long the learner, the first rollout actors and the reward replicas may take to come
    up (placed by Ray, models built). Every 10 s the start says what is still pending; past
    this, the run fails saying the same."""
    gpu_memory_gib: float | None = Field(None, gt=0.0)
    """Memory of each GPU of the cluster, in GiB (80 for an H100). `tame plan` and `tame train`
    check every GPU role's memory plan against it before anything starts; null: not known
    before the start (a learner worker then checks its own GPU as it starts)."""


# --------------------------------------------------------------------------- the tree


class TameConfig(Section):
    run: RunConfig = RunConfig()
    """Run name, output folder and seed."""
    model: ModelConfig = ModelConfig()
    """Model paths and dtype."""
    data: DataConfig = DataConfig()
    """Prompt data for PPO."""
    rollout: RolloutConfig = RolloutConfig()
    """Rollout actors (vLLM engines) and sampling."""
    reward: RewardConfig = RewardConfig()
    """Reward service (Ray Serve) and rule-based rewards."""
    ppo: PPOConfig = PPOConfig()
    """PPO hyper-parameters."""
    learner: LearnerConfig = LearnerConfig()
    """Learner actor: device, resources, checkpoints."""
    train: TrainConfig = TrainConfig()
    """The actor-learner loop: length, batch size, staleness."""
    logging: LoggingConfig = LoggingConfig()
    """Metrics and wandb."""
    cluster: ClusterConfig = ClusterConfig()
    """Which Ray cluster to use."""
    sft: SFTConfig = SFTConfig()
    """Stage 1: supervised fine-tuning (`tame sft`)."""
    reward_model: RewardModelTrainConfig = RewardModelTrainConfig()
    """Stage 2: reward-model training (`tame train-rm`)."""

    @model_validator(mode="after")
    def _whole_prompts_per_batch(self) -> TameConfig:
        per_prompt = self.rollout.sampling.samples_per_prompt
        if self.train.rollout_batch_size % per_prompt:
            raise ValueError(
                f"train.rollout_batch_size ({self.train.rollout_batch_size}) must be a "
                f"multiple of rollout.sampling.samples_per_prompt ({per_prompt})"
            )
        return self

    @model_validator(mode="after")
    def _engines_fit_their_gpu(self) -> TameConfig:
        r = self.rollout
        if 0 < r.num_gpus < 1:
            per_gpu = int(1 / r.num_gpus + 1e-9)  # how many engines Ray packs on one GPU
            if per_gpu * r.gpu_memory_utilization > 0.95:
                raise ValueError(
                    f"rollout.num_gpus {r.num_gpus} packs {per_gpu} engines on one GPU, each taking "
                    f"rollout.gpu_memory_utilization {r.gpu_memory_utilization} of it: "
                    f"{per_gpu * r.gpu_memory_utilization:.2f} > 0.95. Lower gpu_memory_utilization "
                    f"to {0.95 / per_gpu:.2f} or give each engine more of a GPU"
                )
        return self

    @model_validator(mode="after")
    def _adapter_scale_the_engines_hold_exactly(self) -> TameConfig:
        lora = self.learner.lora
        if lora is None or self.model.dtype == "float32":
            return self
        scale = lora.alpha / lora.rank
        if math.frexp(scale)[0] != 0.5:
            raise ValueError(
                f"learner.lora.alpha / learner.lora.rank = {scale:g} is not a power of two: vLLM folds it "
                f"into B in model.dtype {self.model.dtype}, which rounds it, so no adapter load could be "
                f"verified. Use alpha = {2 * lora.rank} (a scale of 2), or model.dtype float32"
            )
        return self

    @model_validator(mode="after")
    def _engines_hold_the_weights_as_sent(self) -> TameConfig:
        sent, held = self.learner.transport_dtype or self.model.dtype, self.model.dtype
        exact = sent == held or held == "float32"  # bfloat16 and float16 widen to float32 exactly
        if not exact:
            raise ValueError(
                f"learner.transport_dtype {sent} sends weights the model.dtype {held} engines round "
                "on arrival, so no weight sync could be verified (the probes are of what was sent): "
                f"use {held}, or null to send model.dtype"
            )
        return self

    @model_validator(mode="after")
    def _reference_as_the_learner_computes(self) -> TameConfig:
        if self.rollout.reference_logprobs and self.learner.param_dtype not in (None, "float32"):
            raise ValueError(
                f"rollout.reference_logprobs has the actors compute the reference from float32 weights, but "
                f"learner.param_dtype {self.learner.param_dtype} has the learner compute the policy from "
                f"{self.learner.param_dtype} ones: the KL would measure their rounding. Drop one of the two"
            )
        return self

    @model_validator(mode="after")
    def _autoscaling_range(self) -> TameConfig:
        scaling = self.reward.autoscaling
        if scaling is not None and scaling.min_replicas > scaling.max_replicas:
            raise ValueError(
                f"reward.autoscaling.min_replicas ({scaling.min_replicas}) is greater than "
                f"reward.autoscaling.max_replicas ({scaling.max_replicas}): Serve would refuse "
                "to deploy. Raise max_replicas or lower min_replicas"
            )
        return self

    @model_validator(mode="after")
    def _a_replica_is_always_up(self, info: ValidationInfo) -> TameConfig:
        scaling = self.reward.autoscaling
        if _command(info) == "train" and scaling is not None and scaling.min_replicas == 0:
            raise ValueError(
                "reward.autoscaling.min_replicas is 0: when scoring pauses Serve may stop every replica, and "
                "the next scoring calls would wait for a reward model to load within reward.timeout_s. Keep "
                "at least 1"
            )
        return self

    @model_validator(mode="after")
    def _reward_model_sees_whole_items(self, info: ValidationInfo) -> TameConfig:
        if _command(info) not in ("train", "serve-reward"):
            return self
        longest = self.data.max_prompt_tokens + self.rollout.sampling.max_new_tokens
        if self.model.reward is not None and self.reward.max_length < longest:
            raise ValueError(
                f"reward.max_length ({self.reward.max_length}) is below data.max_prompt_tokens "
                f"({self.data.max_prompt_tokens}) + rollout.sampling.max_new_tokens "
                f"({self.rollout.sampling.max_new_tokens}) = {longest}: the reward model would cut "
                "the prompt off long items. Raise reward.max_length"
            )
        return self

    # Checks of what one command needs: `load_config(..., command=)` names the command; a
    # config built without one (in code) gets them all, as `tame train` does.

    @model_validator(mode="after")
    def _something_to_score_with(self, info: ValidationInfo) -> TameConfig:
        if _command(info) in ("train", "serve-reward") and self.model.reward is None and not self.reward.functions:
            raise ValueError(
                "model.reward is null and reward.functions is empty: there is nothing to "
                "score with. Name a reward model or a reward function"
            )
        return self

    @model_validator(mode="after")
    def _estimator_has_what_it_needs(self, info: ValidationInfo) -> TameConfig:
        if _command(info) != "train":
            return self
        advantage, n = self.ppo.advantage, self.rollout.sampling.samples_per_prompt
        if advantage in ("grpo", "rloo") and n < 2:
            raise ValueError(
                f"ppo.advantage {advantage} compares the samples of one prompt: "
                f"rollout.sampling.samples_per_prompt must be at least 2 (got {n})"
            )
        if advantage != "gae" and "critic" in self.learner.model_fields_set:
            raise ValueError(
                f"learner.critic is set, but ppo.advantage {advantage} trains no critic: "
                "remove learner.critic, or use ppo.advantage gae"
            )
        return self

    @model_validator(mode="after")
    def _critic_has_its_model(self, info: ValidationInfo) -> TameConfig:
        if (
            _command(info) == "train"
            and self.ppo.advantage == "gae"
            and self.learner.critic == "reward"
            and self.model.reward is None
        ):
            raise ValueError(
                "learner.critic is 'reward' (initialised from the reward model), but "
                "model.reward is null: set learner.critic to 'policy' for rule-based rewards only"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _command(info: ValidationInfo) -> str:
    return (info.context or {}).get("command", "train")


def schema_json() -> str:
    return json.dumps(TameConfig.model_json_schema(), indent=2)
