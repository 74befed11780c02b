"""Whether a run can start on the cluster at all, checked before anything starts.

Ray queues an actor whose resources no node will ever have, silently and forever. So the
run first sums what its roles will ask for, per resource (CPU, GPU, custom resources), and
compares it with what the cluster has: a run that can never be placed is a user error
naming the config fields and the numbers (exit 2), not a hang.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from cluster.shared.config import TameConfig
from cluster.shared.errors import UserError


@dataclass(frozen=True)
class Role:
    """`count` actors of one role, each asking Ray for `each` (resource -> amount)."""

    name: str
    """"learner", "rollout" or "reward": the config section it comes from."""
    count: int
    each: dict[str, float]
    fields: dict[str, str]
    """resource -> how the config spells one actor's ask, e.g. "rollout.num_cpus 1"."""
    count_field: str | None
    """How the config spells the count ("rollout.num_actors 2"); None for a single actor."""


def roles(cfg: TameConfig, only: tuple[str, ...] = ("learner", "rollout", "reward")) -> list[Role]:
    """What the learner, the rollout actors and the reward replicas ask for (those named in
    `only`). The driver's control actor and Serve's own actors take no CPU."""
    learner, rollout, reward = cfg.learner, cfg.rollout, cfg.reward
    replicas = reward.autoscaling.min_replicas if reward.autoscaling else reward.replicas
    replicas_field = ("reward.autoscaling.min_replicas" if reward.autoscaling else "reward.replicas") + f" {replicas}"

    def ask(prefix: str, num_cpus: float, num_gpus: float, custom: dict[str, float]) -> tuple[dict, dict]:
        each = {"CPU": num_cpus, "GPU": num_gpus, **custom}
        fields = {
            "CPU": f"{prefix}.num_cpus {num_cpus:g}",
            "GPU": f"{prefix}.num_gpus {num_gpus:g}",
            **{k: f"{prefix}.resources.{k} {v:g}" for k, v in custom.items()},
        }
        return {k: v for k, v in each.items() if v > 0}, fields

    every = [
        Role(
            "learner",
            learner.num_workers,
            *ask("learner", learner.num_cpus, learner.num_gpus, learner.resources),
            f"learner.num_workers {learner.num_workers}" if learner.num_workers > 1 else None,
        ),
        Role(
            "rollout",
            rollout.num_actors,
            *ask("rollout", rollout.num_cpus, rollout.num_gpus, rollout.resources),
            f"rollout.num_actors {rollout.num_actors}",
        ),
        Role("reward", replicas, *ask("reward", reward.num_cpus, reward.num_gpus, {}), replicas_field),
    ]
    return [role for role in every if role.name in only]


def check_fits(
    cfg: TameConfig,
    total: dict[str, float],
    nodes: list[dict[str, float]],
    only: tuple[str, ...] = ("learner", "rollout", "reward"),
    resources: tuple[str, ...] | None = None,
) -> None:
    """Raise a UserError when the roles named in `only` can never all be placed: a resource
    (of `resources`; all when None) whose sum exceeds the cluster's `total`, or one actor
    that no single node of `nodes` can hold."""
    need: dict[str, float] = defaultdict(float)
    terms: dict[str, list[str]] = defaultdict(list)
    problems = []
    for role in roles(cfg, only):
        for resource, amount in role.each.items():
            if role.count == 0 or (resources is not None and resource not in resources):
                continue
            need[resource] += role.count * amount
            one = role.fields[resource]
            terms[resource].append(f"{role.count_field} x {one}" if role.count_field else one)
            if not any(node.get(resource, 0.0) >= amount - 1e-9 for node in nodes):
                biggest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
                problems.append(f"{one} {resource}: no node has that much (the largest has {biggest:g})")
    for resource, amount in need.items():
        have = total.get(resource, 0.0)
        if amount > have + 1e-9:
            problems.append(
                f"the run needs {amount:g} {resource}: {' + '.join(terms[resource])}; the cluster has {have:g}"
            )
    if problems:
        raise UserError(
            "this cannot be placed on the Ray cluster:\n  "
            + "\n  ".join(problems)
            + "\nLower one of these, or give the cluster more (cluster.num_cpus for a local Ray). "
            "On a cluster that adds nodes as it needs them, set cluster.check_resources: false."
        )


def check_local(cfg: TameConfig) -> None:
    """`check_fits` on CPUs alone, before this process starts a local Ray of
    cluster.num_cpus CPUs: a run that cannot fit fails in a second rather than after Ray's
    start. GPUs and custom resources wait for `check_cluster`, which sees what Ray detects."""
    if cfg.cluster.check_resources and cfg.cluster.num_cpus is not None:
        cpus = {"CPU": float(cfg.cluster.num_cpus)}
        check_fits(cfg, cpus, [cpus], resources=("CPU",))


def check_cluster(cfg: TameConfig, only: tuple[str, ...] = ("learner", "rollout", "reward")) -> None:
    """`check_fits` against the connected Ray cluster's live nodes."""
    import ray

    if not cfg.cluster.check_resources:
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_fits(cfg, ray.cluster_resources(), nodes, only)


def ask(role: Role) -> str:
    """One actor's ask as the config spells it: "rollout.num_cpus 1, rollout.resources.ssd 1"."""
    return ", ".join(role.fields[resource] for resource in role.each) or "nothing"


def free_on_cluster(also: tuple[str, ...] = ()) -> str:
    """What the cluster has free now, per resource: its CPUs and GPUs, and the resources in
    `also` (those a pending role asks for, which no node may have)."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    keys = list(dict.fromkeys(["CPU", *(["GPU"] if "GPU" in total else []), *also]))
    return "free on the cluster: " + ", ".join(f"{free.get(k, 0.0):g} of {total.get(k, 0.0):g} {k}" for k in keys)


def gpu_env(num_gpus: float) -> dict[str, str]:
    """Environment of a role's process: one that asks Ray for no GPU sees none. Ray 2.60 no
    longer hides the GPUs from such a process, so it would land on GPU 0, outside Ray's
    accounting and beside an engine that counts on having that GPU to itself."""
    return {"CUDA_VISIBLE_DEVICES": ""} if num_gpus == 0 else {}
