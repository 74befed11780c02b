"""LoRA next to full weights, in one run, per asset size: sync, update, and the engine's speed.

For each size (small: 3.6M parameters, base: 86M), a full-weight learner and a LoRA learner
(rank 16, every linear layer of the decoder; GRPO, so neither holds a critic) each run as a Ray
actor and make `--updates` updates on the same scored rollouts (the same tokens), publishing
every version; a rollout actor of the same config loads and verifies each. Reported:
- one sync as the run pays it: the learner's publish (tensors and probes into the object
  store) plus the actor's load and its verification, with the bytes moved; full / LoRA;
- the learner's update seconds (publication included) and its process's peak RSS, with the
  batch in one micro-batch (the first PPO pass is the proximal one: no no-grad twin); once with
  the learner's own reference pass, once with the reference log-probs the actors send
  (`rollout.reference_logprobs`), when the trained pass is all the learner makes;
- the rollout actor's tokens/s serving the adapter, against a full-weight actor's (no LoRA in
  its engine) on the same prompts and sampling, rounds alternating between the two.
The first update of each learner is left out of the timings (allocation, first kernels).

    .venv/bin/python benchmarks/lora.py [--sizes small base] [--updates 4] [--rounds 3]

Prints a table and, as its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.rollout import load_prompts  # noqa: E402
from cluster.shared.config import TameConfig  # noqa: E402

RANK = 16


def make_config(policy: Path, lora: bool, max_new_tokens: int, actors_reference: bool = False) -> TameConfig:
    return TameConfig.model_validate(
        {
            "model": {"policy": str(policy), "reward": None},
            "reward": {"functions": [{"function": "cluster.demo.world:gold_reward"}]},
            "rollout": {
                "reference_logprobs": actors_reference,
                "num_cpus": 1,
                "max_model_len": 512,
                "kv_cache_gib": 0.5,
                "sampling": {"max_new_tokens": max_new_tokens, "samples_per_prompt": 4},
            },
            "ppo": {
                "advantage": "grpo",
                "minibatch_size": 32,
                "micro_batch_size": 32,
                "learning_rate": 1e-4 if lora else 1e-5,
            },
            "learner": {"num_cpus": 1, "threads": 2, **({"lora": {"rank": RANK, "alpha": 2 * RANK}} if lora else {})},
            "train": {"rollout_batch_size": 32},
        }
    )


def peak_rss(learner) -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_and_sync(cfg: TameConfig, rollouts, actor, updates: int, ray) -> dict:
    """`updates` updates of a learner actor on `rollouts`, each version loaded by `actor` (None:
    the updates alone)."""
    from learner.learner import Learner

    learner = ray.remote(num_cpus=1)(Learner).remote(cfg, tempfile.mkdtemp(prefix="tame-lora-bench-"))
    if actor is not None:
        first = ray.get(actor.load_weights.remote(ray.get(learner.publish.remote())))
        assert first.verified, first.problem
    rows = []
    for _ in range(updates):
        start = time.perf_counter()
        result = ray.get(learner.update.remote(rollouts))
        update_s = time.perf_counter() - start
        load = None if actor is None else ray.get(actor.load_weights.remote(result.weights))
        if load is not None and not load.verified:
            raise RuntimeError(f"version {result.version} not verified: {load.problem}")
        rows.append((update_s, result.metrics["perf/publish_seconds"], load))
    rss = ray.get(learner.__ray_call__.remote(peak_rss))
    trained = result.metrics["learner/trained_parameters"]
    ray.kill(learner)
    steady = rows[1:]
    if actor is None:
        return {"update_seconds": statistics.median(r[0] for r in steady), "peak_rss_gib": rss / 2**30}
    publish = statistics.median(r[1] for r in steady)
    load = statistics.median(r[2].seconds for r in steady)
    return {
        "trained_parameters": trained,
        "update_seconds": statistics.median(r[0] for r in steady),
        "peak_rss_gib": rss / 2**30,
        "sync_bytes": steady[0][2].bytes,
        "publish_seconds": publish,
        "load_seconds": load,
        "verify_seconds": statistics.median(r[2].verify_seconds for r in steady),
        "sync_seconds": publish + load,
    }


def tokens_per_s(actors: dict, prompts, rounds: int, ray) -> dict[str, float]:
    """Median tokens/s of each actor's `generate` on the same prompts, rounds alternating."""
    seen: dict[str, list[float]] = {name: [] for name in actors}
    for actor in actors.values():  # warm-up: the first call under an adapter prepares kernels
        ray.get(actor.generate.remote(prompts))
    for _ in range(rounds):
        for name, actor in actors.items():
            start = time.perf_counter()
            batch = ray.get(actor.generate.remote(prompts))
            seen[name].append(batch.generated_tokens / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in seen.items()}


def measure(size: str, args, ray) -> dict:
    from transformers import AutoTokenizer

    from actors.reference import Reference
    from actors.rollout import RolloutActor
    from cluster.demo.assets import ensure_assets
    from cluster.demo.world import gold_reward

    assets = ensure_assets(Path(args.assets) / size, size, seed=0)
    cfgs = {mode: make_config(assets.policy, mode == "lora", args.max_new_tokens) for mode in ("full", "lora")}
    remote = ray.remote(num_cpus=1)(RolloutActor)
    actors = {mode: remote.remote(cfg, 0) for mode, cfg in cfgs.items()}
    ray.get([a.ready.remote() for a in actors.values()])

    # One batch of scored rollouts from the base policy, trained on by both learners.
    prompts = load_prompts(assets.data / "prompts.jsonl", 8)
    batch = ray.get(actors["full"].generate.remote(prompts))
    for rollout in batch.rollouts:
        rollout.score = gold_reward(rollout.prompt_text, rollout.response_text)

    out = {mode: train_and_sync(cfgs[mode], batch.rollouts, actors[mode], args.updates, ray) for mode in cfgs}
    # The same rollouts with the reference log-probs the actors would send
    # (`rollout.reference_logprobs`): the learner then makes no pass but the trained one.
    given = copy.deepcopy(batch.rollouts)
    pad_id = AutoTokenizer.from_pretrained(assets.policy).pad_token_id
    Reference(make_config(assets.policy, False, args.max_new_tokens, True), pad_id).annotate(given)
    for mode in cfgs:
        cfg = make_config(assets.policy, mode == "lora", args.max_new_tokens, actors_reference=True)
        sent = train_and_sync(cfg, given, None, args.updates, ray)
        out[mode]["update_seconds_actors_reference"] = sent["update_seconds"]
        out[mode]["peak_rss_gib_actors_reference"] = sent["peak_rss_gib"]
    speed = tokens_per_s(actors, load_prompts(assets.data / "prompts.jsonl", args.prompts), args.rounds, ray)
    for actor in actors.values():
        ray.kill(actor)
    full, lora = out["full"], out["lora"]
    return {
        "size": size,
        "rank": RANK,
        "full": full,
        "lora": lora,
        "sync_bytes_ratio": full["sync_bytes"] / lora["sync_bytes"],
        "sync_seconds_ratio": full["sync_seconds"] / lora["sync_seconds"],
        "update_speedup": full["update_seconds"] / lora["update_seconds"],
        "update_speedup_actors_reference": full["update_seconds_actors_reference"]
        / lora["update_seconds_actors_reference"],
        "peak_rss_ratio": lora["peak_rss_gib"] / full["peak_rss_gib"],
        "full_engine_tokens_per_s": speed["full"],
        "lora_engine_tokens_per_s": speed["lora"],
        "engine_ratio": speed["lora"] / speed["full"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", default="runs/assets", help="folder of the <size>/ assets (built when missing)")
    parser.add_argument("--sizes", nargs="*", default=["small", "base"])
    parser.add_argument("--updates", type=int, default=4, help="updates per learner (the first is not timed)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per generation round")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = [measure(size, args, ray) for size in args.sizes]
    ray.shutdown()
    print(
        f"{'':<8}{'':<6}{'sync MB':>9}{'sync s':>9}{'update s':>10}{'(ref sent)':>11}"
        f"{'peak RSS GiB':>14}{'tokens/s':>10}"
    )
    for r in results:
        for mode in ("full", "lora"):
            m = r[mode]
            speed = r[f"{mode}_engine_tokens_per_s"]
            print(
                f"{r['size']:<8}{mode:<6}{m['sync_bytes'] / 1e6:>9.2f}{m['sync_seconds']:>9.3f}"
                f"{m['update_seconds']:>10.2f}{m['update_seconds_actors_reference']:>11.2f}"
                f"{m['peak_rss_gib']:>14.2f}{speed:>10.0f}"
            )
        print(
            f"{r['size']:<8}ratio   bytes {r['sync_bytes_ratio']:.0f}x, sync {r['sync_seconds_ratio']:.1f}x, "
            f"update {r['update_speedup']:.2f}x ({r['update_speedup_actors_reference']:.2f}x ref sent), "
            f"RSS {r['peak_rss_ratio']:.2f}x, engine {r['engine_ratio']:.2f}x"
        )
    print(json.dumps({"lora": results}))


if __name__ == "__main__":
    main()
