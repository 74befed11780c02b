"""What does sharding the learner over N workers cost on one machine?

In one run, on the same tokens, for N = 1 and N = 2 learner workers (each a Ray actor; N = 2
is FSDP2 over gloo, each worker with cores / N threads, so both settings use the same cores):

- `update`: one PPO update (`learner.update`), GAE with a critic;
- `publish`: putting the policy into the object store, with its probes, the update's last
  step (`perf/publish_seconds`; `update` is the rest of the call). Sharded,
  every tensor is first gathered from the workers, one at a time;
- the baseline: a memory copy of the same bytes in this process.

On CPU, sharding buys memory (each worker holds 1/N of the weights, gradients and optimizer
states), not speed: the cores are the same and the gathers come on top. The figures say how
much it costs. Best of --repeats after one warm-up. The last line is one JSON object.

    .venv/bin/python benchmarks/sharded.py [--size small|base] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.demo.assets import ensure_assets  # noqa: E402
from cluster.launch import start_learner  # noqa: E402
from cluster.shared.config_file import load_config  # noqa: E402
from cluster.shared.records import Rollout  # noqa: E402
from cluster.shared.threads import available_cores  # noqa: E402
from cluster.shared.tokens import prompt_token_ids  # noqa: E402


def rollouts(assets, n: int, new_tokens: int) -> list[Rollout]:
    """n prompts of the assets with random responses of `new_tokens` tokens (timing only)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.policy)
    rng = random.Random(0)
    lines = (assets.data / "prompts.jsonl").read_text().splitlines()[:n]
    out = []
    for i, line in enumerate(lines):
        text = json.loads(line)["prompt"]
        response = [rng.randrange(3, tokenizer.vocab_size) for _ in range(new_tokens)]
        out.append(
            Rollout(
                f"0:{i}",
                0,
                text,
                prompt_token_ids(tokenizer, text),
                response,
                "",
                [-1.0] * new_tokens,
                "length",
                0,
                0,
                0.0,
                score=rng.random(),
            )
        )
    return out


def memcpy_seconds(nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=32, help="rollouts per update")
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cores = available_cores()
    assets = ensure_assets(f"runs/assets/{args.size}", args.size, seed=0, log=lambda *_: None)
    batch = rollouts(assets, args.batch, args.new_tokens)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    results: dict[int, dict[str, float]] = {}
    for workers in (1, 2):
        cfg = load_config(
            None,
            [
                f"model.policy={assets.policy}",
                f"model.reward={assets.reward}",
                "learner.num_cpus=1",
                f"learner.threads={max(1, cores // workers)}",
                f"learner.num_workers={workers}",
                f"train.rollout_batch_size={args.batch}",
                f"ppo.minibatch_size={args.batch}",
                f"ppo.micro_batch_size={args.micro}",
                f"rollout.sampling.max_new_tokens={args.new_tokens}",
                "run.output_dir=/tmp/tame-benchmark-sharded",
                f"run.name=w{workers}",
            ],
        )
        learner, group = start_learner(cfg)
        update, publish = float("inf"), float("inf")
        nbytes = 0
        for i in range(args.repeats + 1):  # the first is the warm-up
            started = time.perf_counter()
            result = ray.get(learner.update.remote(batch))  # an update ends by publishing its version
            seconds = time.perf_counter() - started
            nbytes = result.weights.nbytes
            if i:
                published = result.metrics["perf/publish_seconds"]
                update, publish = min(update, seconds - published), min(publish, published)
        results[workers] = {"update_s": update, "publish_s": publish}
        ray.kill(learner)
        if group is not None:
            remove_placement_group(group)
    memcpy = memcpy_seconds(nbytes, args.repeats)

    print(
        f"sharded learner benchmark: {args.size} assets ({nbytes / 1e6:.1f} MB of policy), {args.batch} rollouts "
        f"x {args.new_tokens} tokens, micro-batch {args.micro}, {cores} cores shared by the workers, "
        f"best of {args.repeats}"
    )
    print(f"{'workers':<10}{'update s':>10}{'x 1 worker':>12}{'publish s':>12}{'x memcpy':>10}")
    for workers, r in results.items():
        print(
            f"{workers:<10}{r['update_s']:>10.3f}{r['update_s'] / results[1]['update_s']:>12.2f}"
            f"{r['publish_s']:>12.3f}{r['publish_s'] / memcpy:>10.1f}"
        )
    print(f"memcpy of the same bytes: {memcpy:.4f} s")
    print(
        json.dumps(
            {
                "benchmark": "sharded",
                "size": args.size,
                "policy_bytes": nbytes,
                "cores": cores,
                "memcpy_s": round(memcpy, 5),
                **{f"w{w}_{k}": round(v, 4) for w, r in results.items() for k, v in r.items()},
                "update_w2_over_w1": round(results[2]["update_s"] / results[1]["update_s"], 3),
                "publish_w2_over_w1": round(results[2]["publish_s"] / results[1]["publish_s"], 3),
            }
        )
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
