"""`tame plan`: what every process of a run holds, worked out before anything starts.

A learner worker's part is `learner.memory`. A rollout actor holds its engine's weights
(`model.dtype`) and KV cache: on a GPU the engine takes `rollout.gpu_memory_utilization` of it,
and the KV cache gets what the weights and the engine's workspace leave; on a CPU,
`rollout.kv_cache_gib`. A reward replica holds its model (`model.dtype`) and one scoring
batch's activations. `check` is what `tame train` runs before anything starts: a process that
would not fit its device is a user error naming the fields, with the single changes that
would make the learner fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.shared.config import TameConfig
from cluster.shared.errors import UserError
from cluster.shared.lora import adapter_layout, engine_args
from cluster.shared.reward_folder import reward_members
from learner.memory import (
    CPU_PROCESS,
    GIB,
    GPU_PROCESS,
    Budget,
    Line,
    Shape,
    WorkerPlan,
    describe,
    learner_worker,
    row,
    shape,
    verdict,
)

ENGINE_PROCESS = int(1.0 * GIB)
"""A vLLM engine on a CPU beside its weights and KV cache."""


@dataclass(frozen=True)
class RolePlan:
    """A rollout actor or a reward replica."""

    name: str
    count: int
    device: str
    lines: list[Line]
    budget: Budget
    problem: str | None = None

    @property
    def total(self) -> int:
        return sum(x.nbytes for x in self.lines)

    def fits(self) -> bool:
        return self.problem is None and (self.budget.nbytes is None or self.total <= self.budget.nbytes)

    def render(self) -> str:
        out = [f"{self.name} (x{self.count}, {self.device}; {describe(self.budget)})"]
        out += [row(x) for x in self.lines]
        out.append(row(Line("= total", self.total)) + verdict(self.fits()))
        if self.problem:
            out.append(f"  {self.problem}")
        return "\n".join(out)


@dataclass(frozen=True)
class Plan:
    learner: WorkerPlan
    roles: list[RolePlan]
    host: Budget
    """This machine's memory when every process of the run lives on it (CPU, local Ray)."""

    def host_bytes(self) -> int:
        return self.learner.update_bytes * self.learner.workers + sum(r.total * r.count for r in self.roles)

    def render(self) -> str:
        parts = [self.learner.render(), *(r.render() for r in self.roles)]
        if self.host.nbytes is not None:
            parts.append(
                row(Line(f"every process on this machine ({describe(self.host)})", self.host_bytes()))
                + verdict(self.host_bytes() <= self.host.nbytes)
            )
        return "\n\n".join(parts)


# --------------------------------------------------------------------------- actors and replicas

ENGINE_WORKSPACE = int(2.0 * GIB)
"""What a GPU engine's budget holds beside weights and KV cache: activations of its largest
batch, CUDA graphs, the sampler. An estimate: vLLM profiles it at start-up."""


def _element(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def rollout_actor(cfg: TameConfig, policy: Shape, gpu: int | None) -> RolePlan:
    """One rollout actor: its engine's weights and KV cache (module docstring)."""
    r = cfg.rollout
    weights = policy.parameters * _element(cfg.model.dtype)
    kv_per_token = 2 * policy.layers * policy.kv_width * _element(cfg.model.dtype)
    lines = [Line(f"engine weights, {cfg.model.dtype} ({policy.parameters / 1e9:.2f}B parameters)", weights)]
    if cfg.learner.lora is not None:  # vLLM's slots for adapters, at its rank, one per version in use
        args = engine_args(cfg.learner.lora, cfg.train.max_staleness)
        per_rank = sum(math.prod(s) for s in adapter_layout(cfg).values()) // cfg.learner.lora.rank
        slots = args["max_loras"] * args["max_lora_rank"] * per_rank * _element(cfg.model.dtype)
        lines.append(Line(f"LoRA slots: {args['max_loras']} versions at rank {args['max_lora_rank']}", slots))
        weights += slots
    problem = None
    if r.num_gpus > 0:
        budget = Budget(
            None if gpu is None else int(min(1.0, r.num_gpus) * gpu),
            "its GPU share, cluster.gpu_memory_gib" if gpu else "GPU memory unknown: cluster.gpu_memory_gib",
        )
        if gpu is not None:
            engine = int(r.gpu_memory_utilization * gpu)
            kv = engine - weights - ENGINE_WORKSPACE
            lines += [
                Line("engine workspace: activations, CUDA graphs (vLLM profiles it)", ENGINE_WORKSPACE),
                Line(f"KV cache: the rest of gpu_memory_utilization {r.gpu_memory_utilization:g}", max(kv, 0)),
            ]
            held = max(kv, 0) // kv_per_token
            if held < r.max_model_len:
                problem = (
                    f"the KV cache holds {held} tokens, fewer than rollout.max_model_len {r.max_model_len}: "
                    "vLLM would not start. Raise rollout.gpu_memory_utilization or lower max_model_len"
                )
            else:
                lines[-1] = Line(
                    f"KV cache, the rest of that share: {held} tokens, {held // r.max_model_len} x max_model_len", kv
                )
            lines.append(Line("the process (CUDA context)", GPU_PROCESS))
    else:
        budget = Budget(None, "host memory")
        lines += [
            Line("KV cache (rollout.kv_cache_gib)", int(r.kv_cache_gib * GIB)),
            Line("the engine's process", ENGINE_PROCESS),
        ]
    if r.reference_logprobs:
        lines.append(
            Line("the reference beside the engine, float32 (rollout.reference_logprobs)", 4 * policy.parameters)
        )
    return RolePlan("rollout actor", r.num_actors, "gpu" if r.num_gpus else "cpu", lines, budget, problem)


def reward_replica(cfg: TameConfig, members: list[Shape], gpu: int | None) -> RolePlan:
    """One reward replica: its model (every member of an ensemble) and one scoring batch's
    activations (no gradient: the hidden states and normalised copy beside one MLP's three
    intermediate-wide tensors; an ensemble's members take the batch one after another)."""
    rc = cfg.reward
    element = _element(cfg.model.dtype)
    tokens = rc.max_batch_size * rc.max_length
    parameters = sum(m.parameters for m in members)
    ensemble = f", {len(members)} members" if len(members) > 1 else ""
    lines = [
        Line(
            f"reward model weights{ensemble}, {cfg.model.dtype} ({parameters / 1e9:.2f}B parameters)",
            parameters * element,
        ),
        Line(
            f"activations, {rc.max_batch_size} x {rc.max_length} tokens",
            tokens * element * max(2 * m.hidden + 3 * m.intermediate for m in members),
        ),
        Line("the process", GPU_PROCESS if rc.num_gpus else CPU_PROCESS),
    ]
    replicas = rc.autoscaling.max_replicas if rc.autoscaling else rc.replicas
    if rc.num_gpus:
        budget = Budget(
            None if gpu is None else int(min(1.0, rc.num_gpus) * gpu),
            "its GPU share" if gpu else "GPU memory unknown: cluster.gpu_memory_gib",
        )
    else:
        budget = Budget(None, "host memory")
    return RolePlan("reward replica", replicas, "gpu" if rc.num_gpus else "cpu", lines, budget)


# --------------------------------------------------------------------------- the run


def plan(cfg: TameConfig, host_bytes: int | None = None) -> Plan:
    """Every role's memory (module docstring). `host_bytes`: this machine's memory, when every
    process of the run lives on it (a local Ray); the learner worker's budget on a CPU."""
    gpu = None if cfg.cluster.gpu_memory_gib is None else int(cfg.cluster.gpu_memory_gib * GIB)
    if cfg.learner.device == "cuda":
        budget = Budget(gpu, "cluster.gpu_memory_gib" if gpu else "GPU memory unknown: cluster.gpu_memory_gib")
    else:
        budget = Budget(None, "host memory, shared with the run's other processes")
    learner = learner_worker(cfg, budget)
    roles = [rollout_actor(cfg, shape(cfg, "policy", cfg.model.policy), gpu)]
    if cfg.model.reward is not None:
        members = reward_members("model.reward", cfg.model.reward).values()
        roles.append(reward_replica(cfg, [shape(cfg, "critic", m) for m in members], gpu))
    return Plan(learner, roles, Budget(host_bytes, "this machine's memory"))


def check(cfg: TameConfig, host_bytes: int | None = None) -> Plan:
    """The plan; a UserError naming the fields, and layouts that would fit, when a process
    would not fit its device (or, on one machine, the processes together its memory)."""
    p = plan(cfg, host_bytes)
    problems = []
    if not p.learner.fits():
        problems.append(_learner_problem(cfg, p.learner))
    for role in p.roles:
        if not role.fits():
            problems.append(
                role.problem
                or (
                    f"a {role.name} needs {role.total / GIB:.1f} GiB, its device share has "
                    f"{role.budget.nbytes / GIB:.1f} GiB"
                )
            )
    if p.host.nbytes is not None and p.host_bytes() > p.host.nbytes:
        problems.append(
            f"the run's processes together need {p.host_bytes() / GIB:.1f} GiB, this machine has "
            f"{p.host.nbytes / GIB:.1f} GiB (learner.num_workers, rollout.num_actors, "
            "rollout.kv_cache_gib, reward.replicas)"
        )
    if problems:
        raise UserError(
            "the run does not fit its memory (`tame plan` shows the whole plan):\n  "
            + "\n  ".join(problems)
            + "\n\n"
            + p.render()
        )
    return p


def _learner_problem(cfg: TameConfig, worker: WorkerPlan) -> str:
    lc, p = cfg.learner, cfg.ppo
    need, have = worker.update_bytes / GIB, worker.budget.nbytes / GIB
    what = (
        f"a learner worker needs {need:.1f} GiB at its update peak ({worker.peak_phase}), "
        f"its device has {have:.1f} GiB ({worker.budget.source}); with learner.num_workers {lc.num_workers}, "
        f"ppo.micro_batch_size {p.micro_batch_size}, learner.gradient_checkpointing "
        f"{str(lc.gradient_checkpointing).lower()}, ppo.advantage {p.advantage}"
    )
    fits = [f"{change} ({peak / GIB:.1f} GiB)" for change, peak in _alternatives(cfg, worker.budget)]
    return what + (
        ". Would fit: " + "; ".join(fits)
        if fits
        else ". No single change fits: "
        "more learner workers together with gradient checkpointing and a smaller micro-batch"
    )


def _alternatives(cfg: TameConfig, budget: Budget) -> list[tuple[str, int]]:
    """Single changes of the config after which a learner worker fits `budget`, each with its
    update peak."""
    lc, p = cfg.learner, cfg.ppo

    def peak(**changes) -> int:
        sections = {}
        for key, value in changes.items():
            section, field = key.split("__")
            sections.setdefault(section, {})[field] = value
        changed = cfg.model_copy(
            update={name: getattr(cfg, name).model_copy(update=fields) for name, fields in sections.items()}
        )
        return learner_worker(changed, budget).update_bytes

    found = []
    for n in (2**k for k in range(0, 13)):
        if n > lc.num_workers and (bytes_ := peak(learner__num_workers=n)) <= budget.nbytes:
            found.append((f"learner.num_workers {n}", bytes_))
            break
    if not lc.gradient_checkpointing and (bytes_ := peak(learner__gradient_checkpointing=True)) <= budget.nbytes:
        found.append(("learner.gradient_checkpointing true", bytes_))
    for micro in (m for m in (p.micro_batch_size // 2**k for k in range(1, 8)) if m >= 1):
        if (bytes_ := peak(ppo__micro_batch_size=micro)) <= budget.nbytes:
            found.append((f"ppo.micro_batch_size {micro}", bytes_))
            break
    if p.advantage == "gae" and (bytes_ := peak(ppo__advantage="grpo")) <= budget.nbytes:
        found.append(("a critic-free estimator (ppo.advantage grpo, rloo or reinforce_pp)", bytes_))
    if not cfg.rollout.reference_logprobs and (bytes_ := peak(rollout__reference_logprobs=True)) <= budget.nbytes:
        found.append(("rollout.reference_logprobs true (the actors hold the reference)", bytes_))
    return found
