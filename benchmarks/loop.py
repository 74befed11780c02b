"""The actor-learner loop against a one-process PPO baseline on the same cores, in one run.

For each model size (the small assets, about 3.6M parameters, and the tiny ones), with 32
prompts per update, one PPO epoch and 16 updates, on each workload:

- *uniform*: the untrained policy, whose responses nearly all run to the 64-token cap;
- *long-tail*: the policy after a brief SFT on the demo world (96 examples, one epoch,
  seconds; built once into `<assets>/<size>-early-sft`): it has learnt to answer and to stop,
  not yet reliably, so its responses run from one token to the 128-token cap (on the small
  assets: mean about 38, a tenth at 100 or more), as real chat and reasoning answers do.

The configurations:

- *one process*: what a single-process PPO trainer does, in this process with every core:
  Hugging Face `generate` with sampling, the reward model's forward (`RewardModel.score`),
  and the same `Learner.update`, one after the other;
- *tame, max_staleness 0*: `tame train` on Ray (a vLLM rollout actor, the Serve reward
  service, the learner), synchronous: the roles take turns, each with 2 threads;
- *tame, max_staleness 1*: the same, overlapped: the actor (1 thread) generates the next
  batch while the learner (2 threads, waiting passively) trains.

The reference log-probs are the learner's pass, as in the one-process baseline and
configs/smoke.yaml; `--reference actors` has the actor compute them while the reward service
scores (`rollout.reference_logprobs`).

Samples/s counts from the end of the first update in every case (start-up and warm-up are
reported apart). Next to it: samples dropped as too stale; the shares of each interval the
learner and the actors sat idle; the pipeline efficiency, samples/s / (B / max(t_actor,
t_update)) with both times measured in the same run (1.0: the slower role never waits;
t_actor = t_generate + max(t_score, t_reference), the reference pass running beside the
scoring); and the physical limit on these cores, cores / (core-seconds per sample of
generation + scoring + update with its reference pass, each measured on one thread). Where
the cores went in each tame run's steady state: the CPU time of each role's processes per
sample (Linux /proc), everything else (Ray, Serve, the driver, the kernel) and the share of
the machine busy.

    .venv/bin/python benchmarks/loop.py [--sizes small tiny] [--workloads uniform long-tail]
                                        [--updates 16] [--staleness 0 1] [--sweep-threads]
                                        [--compute-dtype float32|bfloat16] [--reference actors|learner]

Each tame run also reports its engine's mean occupancy (sequences per step), generation
tokens/s and the share of samples whose tokens span two versions (weights loaded while they
were generated), where the run logs them.

`--compute-dtype bfloat16` runs every learner update (the baseline's too) under bfloat16
autocast (`learner.compute_dtype`), for a CPU with AVX-512 BF16.

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH, CORES = 32, 2
WORKLOADS = {"uniform": 64, "long-tail": 128}
"""Workload -> max_new_tokens."""
EARLY_SFT_EXAMPLES = 96
THREADS = {0: (2, 2, 2), 1: (2, 1, 1)}
"""max_staleness -> threads of (learner, actor, reward replica): what this 2-core machine should use."""


def early_sft(assets: Path, log) -> Path:
    """The long-tailed workload's policy: `assets`' policy after one epoch of SFT on the first
    EARLY_SFT_EXAMPLES examples of the demo world (configs/demo.yaml's settings), built once."""
    from cluster.shared.config_file import load_config
    from learner.sft import run_sft

    out = assets.parent / f"{assets.name}-early-sft"
    if (out / "config.json").exists():
        return out
    data = Path(tempfile.mkdtemp(prefix="tame-early-sft-")) / "sft.jsonl"
    lines = (assets / "data/sft.jsonl").read_text().splitlines()[:EARLY_SFT_EXAMPLES]
    data.write_text("".join(line + "\n" for line in lines))
    log(f"building the long-tailed workload's policy: {out}")
    sets = [f"sft.init={assets / 'policy'}", f"sft.data={data}", f"sft.output={out}", "sft.epochs=1"]
    sets += [f"model.policy={assets / 'policy'}", f"model.reward={assets / 'reward'}"]
    run_sft(
        load_config(REPO / "configs/demo.yaml", [*sets, f"data.prompts={assets / 'data/prompts.jsonl'}"]),
        log=lambda *_: None,
    )
    return out


def overrides(assets: Path, policy: Path, new_tokens: int, updates: int, compute_dtype: str) -> list[str]:
    """The run both sides share: model-only reward, B prompts per update, one epoch, one
    micro-batch (so the first epoch's forward pass is the proximal one, in both), the
    learner's arithmetic."""
    return [
        f"model.policy={policy}",
        f"model.reward={assets / 'reward'}",
        "model.build_assets=null",
        f"learner.compute_dtype={compute_dtype}",
        f"data.prompts={assets / 'data/prompts.jsonl'}",
        f"train.total_updates={updates}",
        f"train.rollout_batch_size={BATCH}",
        f"rollout.prompts_per_batch={BATCH}",
        "ppo.epochs=1",
        f"ppo.minibatch_size={BATCH}",
        f"ppo.micro_batch_size={BATCH}",
        f"rollout.sampling.max_new_tokens={new_tokens}",
        "reward.functions=[]",
        "logging.wandb.mode=disabled",
        "learner.checkpoint_every=1000",
    ]


# --------------------------------------------------------------------------- one process


def hf_rollouts(model, tokenizer, prompts, temperature: float, new_tokens: int):
    """Sampled responses with their behaviour log-probs from Hugging Face `generate`."""
    import torch

    from cluster.shared.records import Rollout
    from cluster.shared.tokens import prompt_token_ids

    ids = [prompt_token_ids(tokenizer, p.messages) for p in prompts]
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for row, i in enumerate(ids):  # left-padded, as generate wants
        input_ids[row, width - len(i) :] = torch.tensor(i)
        attention[row, width - len(i) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new = out.sequences[:, width:]  # (B, T)
    logits = torch.stack(out.logits, dim=1).float() / temperature  # (B, T, V)
    logp = torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0]
    rollouts = []
    for row, prompt in enumerate(prompts):
        tokens = new[row].tolist()
        end = tokens.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in tokens else len(tokens)
        rollouts.append(
            Rollout(
                prompt.prompt_id,
                0,
                prompt.text,
                ids[row],
                tokens[:end],
                tokenizer.decode(tokens[:end], skip_special_tokens=True),
                logp[row, :end].tolist(),
                "stop" if tokens[end - 1] == tokenizer.eos_token_id else "length",
                0,
                -1,
                0.0,
            )
        )
    return rollouts


def one_process(assets: Path, policy: Path, new_tokens: int, updates: int, out: Path, compute_dtype: str) -> dict:
    """The baseline: generate, score, update in sequence in this process, on every core."""
    import torch

    from cluster.prompts import PromptSource
    from cluster.shared.config_file import load_config
    from cluster.shared.data import load_prompts
    from learner.learner import Learner
    from reward_service.model import RewardModel

    cfg = load_config(
        REPO / "configs/smoke.yaml",
        [
            *overrides(assets, policy, new_tokens, updates, compute_dtype),
            f"run.output_dir={out}",
            f"run.name=one-process-{time.monotonic_ns()}",
            f"learner.threads={CORES}",
            "rollout.reference_logprobs=false",
        ],
    )
    learner = Learner(cfg, str(cfg.run_dir))  # sets torch's thread count to CORES
    reward = RewardModel.load(cfg.model.reward, max_length=cfg.reward.max_length)
    source = PromptSource(load_prompts(cfg.data.prompts), cfg.run.seed, cfg.data.shuffle)
    torch.manual_seed(cfg.run.seed)

    steps = []
    for _ in range(updates):
        prompts = source.take(BATCH)
        t0 = time.perf_counter()
        rollouts = hf_rollouts(learner.policy, learner.tokenizer, prompts, cfg.rollout.sampling.temperature, new_tokens)
        t1 = time.perf_counter()
        for r, s in zip(rollouts, reward.score([r.prompt_text for r in rollouts], [r.response_text for r in rollouts])):
            r.score = s
        t2 = time.perf_counter()
        learner.update(rollouts)
        t3 = time.perf_counter()
        steps.append((t1 - t0, t2 - t1, t3 - t2))

    # The core-seconds of scoring and of an update on one thread, for the physical limit.
    torch.set_num_threads(1)
    texts = ([r.prompt_text for r in rollouts], [r.response_text for r in rollouts])
    score_1t = min(timed(lambda: reward.score(*texts)) for _ in range(3))
    update_1t = min(timed(lambda: learner.update(rollouts)) for _ in range(3))
    torch.set_num_threads(CORES)

    steady = steps[1:]  # as for tame: from the end of the first update
    gen, score, update = (statistics.mean(s[i] for s in steady) for i in range(3))
    return {
        "samples_per_s": BATCH / (gen + score + update),
        "generate_s": gen,
        "score_s": score,
        "update_s": update,
        "score_core_s_per_sample": score_1t / BATCH,
        "update_core_s_per_sample": update_1t / BATCH,
    }


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# --------------------------------------------------------------------------- tame


ROLE_TITLES = {"learner": "ray::Learner", "actor": "ray::RolloutActor", "reward": "ray::ServeReplica"}
"""Each role's processes, by the title Ray gives an actor's process."""


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds so far of each role's processes, and the machine's busy, total and stolen
    seconds (Linux /proc; empty elsewhere). Steal is time a virtual machine's cores waited for
    the host: neither busy here nor idle."""
    proc = Path("/proc")
    if not (proc / "stat").exists():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(ROLE_TITLES, 0.0)
    for pid in proc.iterdir():
        if not pid.name.isdigit():
            continue
        try:
            title = (pid / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            stat = (pid / "stat").read_text()
        except OSError:
            continue
        role = next((r for r, t in ROLE_TITLES.items() if title.startswith(t)), None)
        if role is not None:
            fields = stat[stat.rindex(")") + 2 :].split()
            out[role] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    cpu = [int(x) for x in (proc / "stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is in user
    out["machine_total"] = sum(cpu[:8]) / tick
    out["machine_steal"] = cpu[7] / tick
    out["machine_busy"] = out["machine_total"] - (cpu[3] + cpu[4] + cpu[7]) / tick
    return out


class CpuWatch(threading.Thread):
    """Where the cores went in a run's steady state: CPU seconds of each role's processes
    between the end of the first update and the end of the last (`metrics.jsonl` gets a line
    per update), per sample trained in between, next to the share of the machine busy."""

    def __init__(self, metrics: Path, updates: int):
        super().__init__(daemon=True)
        self.metrics, self.updates = metrics, updates
        self.marks: list[tuple[int, dict[str, float]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and len(self.marks) < 2:
            lines = self.metrics.read_bytes().count(b"\n") if self.metrics.exists() else 0
            if (not self.marks and lines >= 1) or (self.marks and lines >= self.updates):
                self.marks.append((lines, cpu_snapshot()))
            time.sleep(0.01)

    def core_ms_per_sample(self) -> dict[str, float]:
        self.done.set()
        self.join()
        if len(self.marks) < 2 or not self.marks[0][1]:
            return {}
        (n0, a), (n1, b) = self.marks
        samples = (n1 - n0) * BATCH
        out = {k: 1e3 * (b[k] - a[k]) / samples for k in ROLE_TITLES}
        busy = b["machine_busy"] - a["machine_busy"]
        out["other"] = 1e3 * busy / samples - sum(out.values())
        total = b["machine_total"] - a["machine_total"]
        out["machine_busy_share"] = busy / total
        out["machine_steal_share"] = (b["machine_steal"] - a["machine_steal"]) / total
        return out


def tame(
    assets: Path,
    policy: Path,
    new_tokens: int,
    updates: int,
    out: Path,
    compute_dtype: str,
    reference: str,
    k: int,
    learner_threads: int,
    actor_threads: int,
    reward_threads: int,
) -> dict:
    from cluster.shared.config_file import load_config
    from cluster.train import train

    name = f"k{k}-l{learner_threads}-a{actor_threads}-r{reward_threads}-{time.monotonic_ns()}"
    cfg = load_config(
        REPO / "configs/smoke.yaml",
        [
            *overrides(assets, policy, new_tokens, updates, compute_dtype),
            f"run.output_dir={out}",
            f"run.name={name}",
            f"train.max_staleness={k}",
            "rollout.num_actors=1",
            "rollout.num_cpus=1",
            "learner.num_cpus=1",
            f"learner.threads={learner_threads}",
            f"rollout.threads={actor_threads}",
            f"reward.threads={reward_threads}",
            f"rollout.reference_logprobs={reference == 'actors'}",
        ],
    )
    watch = CpuWatch(cfg.run_dir / "metrics.jsonl", updates)
    watch.start()
    summary = train(cfg, log=lambda *_: None)
    cores = watch.core_ms_per_sample()
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    mean = lambda key: statistics.mean(r.get(key, math.nan) for r in rows)  # noqa: E731
    t_update = mean("perf/update_seconds")
    t_generate = BATCH * mean("perf/generate_seconds_per_sample")
    t_score = BATCH * mean("perf/score_seconds_per_sample")
    t_reference = BATCH * mean("perf/reference_seconds_per_sample")
    t_actor = t_generate + max(t_score, t_reference)  # the reference runs while the reward service scores
    rate = summary["samples_per_second"]
    return {
        "max_staleness": k,
        "learner_threads": learner_threads,
        "actor_threads": actor_threads,
        "reward_threads": reward_threads,
        "reference": reference,
        "samples_per_s": rate,
        "startup_s": summary["startup_seconds"],
        "wall_s": summary["wall_seconds"],
        "dropped_stale": summary["dropped_stale"],
        "samples": summary["samples"],
        "learner_idle_share": mean("perf/learner_idle_share"),
        "actor_idle_share": mean("perf/actor_idle_share"),
        "update_s": t_update,
        "generate_s": t_generate,
        "score_s": t_score,
        "reference_s": t_reference,
        "actor_s": t_actor,
        "pipeline_efficiency": rate * max(t_actor, t_update) / BATCH,
        "staleness_mean": mean("rollout/staleness_mean"),
        "engine_occupancy": mean("rollout/engine_occupancy"),
        "tokens_per_s": mean("rollout/tokens_per_s"),
        "spanning_share": mean("rollout/spanning_share"),
        "generate_core_s_per_sample": mean("perf/generate_seconds_per_sample") * actor_threads,
        "in_run_core_ms_per_sample": cores,
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s, with the spread of all of them."""
    ranked = sorted(runs, key=lambda r: r["samples_per_s"])
    return {**ranked[len(ranked) // 2], "samples_per_s_all": [round(r["samples_per_s"], 2) for r in runs]}


def bench_size(
    size: str,
    workload: str,
    root: Path,
    updates: int,
    repeats: int,
    sweep: bool,
    compute_dtype: str,
    reference: str,
    staleness: list[int],
    log,
) -> dict:
    """Every configuration `repeats` times, in turns, so that load from other processes on a
    shared machine hits all of them alike; each reported by its median run."""
    from cluster.demo.assets import ensure_assets

    assets = ensure_assets(root / size, size, 0, log=lambda *_: None).root
    policy = early_sft(assets, log) if workload == "long-tail" else assets / "policy"
    new_tokens = WORKLOADS[workload]
    out = Path(tempfile.mkdtemp(prefix=f"tame-loop-{size}-"))
    settings = (
        [(k, lt, at, rt) for k in (0, 1) for lt in (1, 2) for at in (1, 2) for rt in (1, 2)]
        if sweep
        else [(k, *THREADS[k]) for k in staleness]
    )
    bases, runs = [], {s: [] for s in settings}
    for round_ in range(repeats):
        log(f"{size} {workload} round {round_ + 1}/{repeats}: one-process baseline")
        bases.append(one_process(assets, policy, new_tokens, updates, out, compute_dtype))
        for k, lt, at, rt in settings:
            log(
                f"{size} {workload} round {round_ + 1}/{repeats}: tame max_staleness {k}, threads: learner {lt}, "
                f"actor {at}, reward {rt}"
            )
            runs[(k, lt, at, rt)].append(
                tame(assets, policy, new_tokens, updates, out, compute_dtype, reference, k, lt, at, rt)
            )
    base = median_run(bases)
    tames = [median_run(r) for r in runs.values()]
    # The limit on these cores: each sample's generation (on one thread, as the k=1 actor runs
    # it), scoring and update (on one thread), packed perfectly onto CORES cores.
    every = [r for rs in runs.values() for r in rs]
    one_thread_actor = [r for r in every if r["actor_threads"] == 1] or every
    generate = statistics.median(r["generate_core_s_per_sample"] for r in one_thread_actor)
    score = statistics.median(b["score_core_s_per_sample"] for b in bases)
    update = statistics.median(b["update_core_s_per_sample"] for b in bases)
    limit = CORES / (generate + score + update)
    for r in tames:
        r["over_one_process"] = r["samples_per_s"] / base["samples_per_s"]
        r["of_limit"] = r["samples_per_s"] / limit
    return {
        "size": size,
        "workload": workload,
        "new_tokens": new_tokens,
        "compute_dtype": compute_dtype,
        "reference": reference,
        "one_process": base,
        "tame": tames,
        "limit_samples_per_s": limit,
        "limit_over_one_process": limit / base["samples_per_s"],
        "core_s_per_sample": {"generate": generate, "score": score, "update": update},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["small", "tiny"], choices=["tiny", "small", "base"])
    p.add_argument("--workloads", nargs="+", default=["uniform", "long-tail"], choices=list(WORKLOADS))
    p.add_argument("--updates", type=int, default=16)
    p.add_argument("--staleness", nargs="+", type=int, default=[0, 1], choices=[0, 1], help="max_staleness values")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration, in turns (median reported)")
    p.add_argument("--assets", type=Path, default=REPO / "runs/assets", help="folder of the <size>/ assets")
    p.add_argument("--sweep-threads", action="store_true", help="every learner/actor thread count, both staleness")
    p.add_argument(
        "--compute-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the learner's arithmetic (learner.compute_dtype), in the baseline and in tame alike",
    )
    p.add_argument(
        "--reference",
        default="learner",
        choices=["actors", "learner"],
        help="who computes tame's reference log-probs (rollout.reference_logprobs)",
    )
    args = p.parse_args()

    import ray

    from cluster.launch import ENGINE_ENV

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": ENGINE_ENV})
    results = [
        bench_size(
            size,
            workload,
            args.assets,
            args.updates,
            args.repeats,
            args.sweep_threads,
            args.compute_dtype,
            args.reference,
            args.staleness,
            lambda m: print(m, file=sys.stderr, flush=True),
        )
        for size in args.sizes
        for workload in args.workloads
    ]
    ray.shutdown()

    for res in results:
        base = res["one_process"]
        print(
            f"\n{res['size']} assets, {res['workload']} workload: {BATCH} prompts x at most {res['new_tokens']} new "
            f"tokens per update, {args.updates} updates, "
            f"{CORES} cores, learner in {args.compute_dtype}, tame's reference pass on the {args.reference}"
        )
        print(
            f"{'run':<34}{'samples/s':>10}{'x 1-proc':>9}{'of limit':>9}{'eff.':>6}{'dropped':>8}"
            f"{'learner idle':>13}{'actor idle':>11}{'actor s':>12}{'update s':>9}{'start-up s':>11}"
        )
        print(
            f"{'one process (HF generate)':<34}{base['samples_per_s']:>10.1f}{1.0:>9.2f}"
            f"{base['samples_per_s'] / res['limit_samples_per_s']:>9.2f}{'':>6}{0:>8}{'':>13}{'':>11}"
            f"{base['generate_s'] + base['score_s']:>12.2f}{base['update_s']:>9.2f}{'':>11}"
        )
        for r in res["tame"]:
            label = (
                f"tame k={r['max_staleness']} (threads {r['learner_threads']}/{r['actor_threads']}/"
                f"{r['reward_threads']})"
            )
            print(
                f"{label:<34}{r['samples_per_s']:>10.1f}{r['over_one_process']:>9.2f}{r['of_limit']:>9.2f}"
                f"{r['pipeline_efficiency']:>6.2f}{r['dropped_stale']:>8}{r['learner_idle_share']:>13.2f}"
                f"{r['actor_idle_share']:>11.2f}{r['actor_s']:>12.2f}{r['update_s']:>9.2f}"
                f"{r['startup_s']:>11.1f}"
            )
        for r in res["tame"]:
            print(
                f"k={r['max_staleness']}: engine occupancy {r['engine_occupancy']:.1f} sequences per step, "
                f"{r['tokens_per_s']:.0f} generated tokens/s, {r['spanning_share']:.0%} of samples span two versions"
            )
        cost = res["core_s_per_sample"]
        print(
            f"limit: {CORES} cores / ({cost['generate'] * 1e3:.1f} generate + {cost['score'] * 1e3:.1f} score + "
            f"{cost['update'] * 1e3:.1f} update core-ms per sample) = {res['limit_samples_per_s']:.1f} samples/s "
            f"({res['limit_over_one_process']:.2f}x one process)"
        )
        for r in res["tame"]:
            c = r["in_run_core_ms_per_sample"]
            if c:
                print(
                    f"k={r['max_staleness']} (its median run), core-ms per sample: learner {c['learner']:.1f}, "
                    f"actor {c['actor']:.1f}, reward {c['reward']:.1f}, everything else {c['other']:.1f}; "
                    f"machine busy {c['machine_busy_share']:.0%}, stolen by the host {c['machine_steal_share']:.1%}"
                )
        print(
            "samples/s of every round: "
            + "; ".join(
                f"{r['label']}: {r['samples_per_s_all']}"
                for r in [
                    {"label": "one process", **base},
                    *[{"label": f"k={t['max_staleness']}", **t} for t in res["tame"]],
                ]
            )
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
