"""The actor-learner loop end to end: samples/s and step time with max_staleness 0
(synchronous PPO) and 1 (generation overlapping training), on the small assets, in one run.

Also the share of wall time the learner waited for data and the actors waited for weights,
the two costs that asynchronous PPO trades against staleness. Prints a table, then one JSON
object as the last line.

    .venv/bin/python benchmarks/loop.py [--updates 12] [--actors 1] [--assets runs/assets/small]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("WANDB_MODE", "disabled")


def run(assets: Path, out: Path, staleness: int, updates: int, actors: int) -> dict:
    from cluster.config import load_config
    from cluster.controller import train

    cfg = load_config(REPO / "configs/smoke.yaml", [
        f"model.policy={assets / 'policy'}", f"model.reward={assets / 'reward'}", "model.build_assets=null",
        f"data.prompts={assets / 'data/prompts.jsonl'}", f"run.output_dir={out}", f"run.name=stale{staleness}",
        f"train.max_staleness={staleness}", f"train.total_updates={updates}", f"rollout.num_actors={actors}",
        "train.rollout_batch_size=64", "rollout.prompts_per_batch=32", "ppo.minibatch_size=32",
        "ppo.micro_batch_size=32", "rollout.sampling.max_new_tokens=24", "logging.wandb.mode=disabled",
        "reward.functions=[]", "learner.checkpoint_every=1000",
    ])
    summary = train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[len(rows) // 3:]  # the first updates include the engines' warm-up
    step = sum(r["perf/step_seconds"] for r in steady) / len(steady)
    span = steady[-1]["perf/samples"] - steady[0]["perf/samples"]
    return {
        "samples_per_s": summary["samples_per_second"],
        "step_seconds": step,
        "learner_wait_share": rows[-1]["perf/learner_idle_share"],
        "actor_wait_share": rows[-1]["perf/actor_idle_share"],
        "staleness_mean": sum(r["rollout/staleness_mean"] for r in rows) / len(rows),
        "steady_samples": span,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", type=Path, default=REPO / "runs/assets/small")
    p.add_argument("--updates", type=int, default=12)
    p.add_argument("--actors", type=int, default=1)
    args = p.parse_args()

    import ray

    from cluster.assets import ensure_assets

    ensure_assets(args.assets, "small", 0, log=lambda *_: None)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    out = Path(tempfile.mkdtemp(prefix="tame-loop-"))
    results = {k: run(args.assets, out, k, args.updates, args.actors) for k in (0, 1)}
    ray.shutdown()

    print(f"\nactor-learner loop, small assets, {args.actors} actor(s), {args.updates} updates of 64 samples")
    print(f"{'max_staleness':>14} {'samples/s':>10} {'step s':>8} {'learner waits':>14} {'actors wait':>12} {'staleness':>10}")
    for k, r in results.items():
        print(f"{k:>14} {r['samples_per_s']:>10.1f} {r['step_seconds']:>8.2f} {r['learner_wait_share']:>14.2f} "
              f"{r['actor_wait_share']:>12.2f} {r['staleness_mean']:>10.2f}")
    speedup = results[1]["samples_per_s"] / results[0]["samples_per_s"]
    print(f"async / sync samples/s: {speedup:.2f}")
    print(json.dumps({"sync": results[0], "async": results[1], "async_over_sync": speedup}))


if __name__ == "__main__":
    main()
