"""Reward-service throughput: scored items per second through the Serve handle and over HTTP,
against transformers' forward pass alone, in one run.

    .venv/bin/python benchmarks/reward.py [--size small] [--items 1024] [--request-items 32] [--concurrency 4]

Five paths score the same (prompt, response) pairs of the synthetic world:
- raw:    `AutoModelForSequenceClassification` forward on pre-tokenised, right-padded
          batches of `max_batch_size` in this process (the floor: no tokenising, no Serve);
- local:  `RewardModel.score` in this process (tokenising with the chat template + forward);
- handle: `handle.score.remote(...)` with `--concurrency` requests of `--request-items` in flight;
- http:   `POST /v1/score` with the same requests from `--concurrency` client threads;
- ensemble: the handle path again, the replica holding `--members` K models (K links to the
          same folder: the cost of scoring does not depend on the weights), aggregated by
          `min`: what an ensemble adds per item, in the same run.
The raw and local paths use one torch thread, as the single replica (num_cpus=1) does.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _best_rate(run, n_items: int, rounds: int) -> tuple[float, list[float]]:
    """Items per second of `run()` (median over rounds after one warm-up), plus its last result."""
    result = run()  # warm-up: first batches allocate and compile kernels
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return n_items / statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--assets", default="runs/assets", help="folder holding <size>/ assets (built when missing)")
    parser.add_argument("--items", type=int, default=1024)
    parser.add_argument("--request-items", type=int, default=32, help="items per request (handle and HTTP)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--max-batch-size", type=int, default=64, help="serve.batch size (and the raw batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--members", type=int, default=3, help="reward models in the ensemble path")
    args = parser.parse_args()

    import httpx
    import ray
    import torch
    from ray import serve
    from transformers import AutoModelForSequenceClassification

    from cluster.demo.assets import ensure_assets
    from cluster.demo.world import World
    from cluster.shared.config import TameConfig
    from cluster.shared.tokens import pad
    from reward_service.model import RewardModel
    from reward_service.service import deploy

    torch.set_num_threads(1)
    assets = ensure_assets(Path(args.assets) / args.size, args.size, seed=0, log=lambda m: print(f"# {m}"))
    pairs = World.build(0).preference_pairs(args.items, 7)
    prompts, responses = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    requests = list(zip(_chunks(prompts, args.request_items), _chunks(responses, args.request_items)))

    # -- raw transformers forward on pre-tokenised batches ---------------------------------
    local = RewardModel.load(assets.reward)
    ids = [local.encode(p, r) for p, r in zip(prompts, responses)]
    raw_model = AutoModelForSequenceClassification.from_pretrained(assets.reward).eval()
    batches = [pad(chunk, local.tokenizer.pad_token_id) for chunk in _chunks(ids, args.max_batch_size)]

    def run_raw() -> list[float]:
        with torch.inference_mode():
            return [s for x, m in batches for s in raw_model(input_ids=x, attention_mask=m).logits[:, 0].tolist()]

    raw_rate, raw_scores = _best_rate(run_raw, len(ids), args.rounds)

    def run_local() -> list[float]:
        return [
            s
            for chunk in _chunks(list(zip(prompts, responses)), args.max_batch_size)
            for s in local.score([p for p, _ in chunk], [r for _, r in chunk])
        ]

    local_rate, local_scores = _best_rate(run_local, len(ids), args.rounds)

    # -- the service: one replica with one CPU, handle and HTTP ------------------------------
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    cfg = TameConfig.model_validate(
        {
            "model": {"reward": str(assets.reward)},
            "reward": {
                "port": port,
                "replicas": 1,
                "num_cpus": 1,
                "max_batch_size": args.max_batch_size,
                "max_items": max(args.request_items, 1),
                "batch_wait_timeout_s": 0.005,
            },
        }
    )

    def through(handle) -> Callable[[], list[float]]:
        """Every request through `handle` at once, `--concurrency` in flight: the scores in order."""

        def run() -> list[float]:
            with ThreadPoolExecutor(args.concurrency) as pool:
                chunks = pool.map(lambda pr: handle.score.remote(*pr).result(timeout_s=300), requests)
                return [s for chunk in chunks for s in chunk]

        return run

    handle_rate, handle_scores = _best_rate(through(deploy(cfg, name="bench-reward")), len(ids), args.rounds)

    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=300, limits=httpx.Limits(max_connections=args.concurrency)
    ) as http:

        def post(pr) -> list[float]:
            body = {"items": [{"prompt": p, "response": r} for p, r in zip(*pr)]}
            answer = http.post("/v1/score", json=body)
            answer.raise_for_status()
            return answer.json()["scores"]

        def run_http() -> list[float]:
            with ThreadPoolExecutor(args.concurrency) as pool:
                return [s for chunk in pool.map(post, requests) for s in chunk]

        http_rate, http_scores = _best_rate(run_http, len(ids), args.rounds)

    # -- the same replica scoring with an ensemble of --members models ------------------------
    import tempfile

    serve.delete("bench-reward")  # its route and its CPU, for the ensemble's replica
    ensemble = Path(tempfile.mkdtemp(prefix="tame-ensemble-"))
    members = [f"member-{i}" for i in range(args.members)]
    for member in members:
        (ensemble / member).symlink_to(Path(assets.reward).resolve())
    (ensemble / "ensemble.json").write_text(json.dumps({"members": members}))
    ensemble_cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"reward": str(ensemble)}),
            "reward": cfg.reward.model_copy(
                update={"ensemble": cfg.reward.ensemble.model_copy(update={"aggregation": "min"})}
            ),
        }
    )
    ensemble_rate, ensemble_scores = _best_rate(
        through(deploy(ensemble_cfg, name="bench-ensemble")), len(ids), args.rounds
    )
    serve.shutdown()
    shutil.rmtree(ensemble)
    ray.shutdown()

    # Every path scored the same items: the figures compare like with like.
    worst = max(
        max(abs(a - b) for a, b in zip(raw_scores, other))
        for other in (local_scores, handle_scores, http_scores, ensemble_scores)  # K equal members: min = each
    )

    rows = [
        ("raw transformers forward (pre-tokenised)", raw_rate),
        ("RewardModel.score in process", local_rate),
        ("Serve handle", handle_rate),
        ("HTTP POST /v1/score", http_rate),
        (f"Serve handle, ensemble of {args.members}", ensemble_rate),
    ]
    print(
        f"\n{args.items} items, {args.request_items} per request, {args.concurrency} in flight, "
        f"{args.size} reward model, serve.batch {args.max_batch_size}, 1 replica x 1 CPU\n"
    )
    print(f"| {'path':<42} | {'items/s':>9} | {'/ raw':>6} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 8}|")
    for name, rate in rows:
        print(f"| {name:<42} | {rate:>9.0f} | {rate / raw_rate:>6.2f} |")
    extra_ms = 1000 * (1 / ensemble_rate - 1 / handle_rate)
    print(f"\nlargest score difference from the raw forward: {worst:.2e}")
    print(
        f"an ensemble of {args.members}: {handle_rate / ensemble_rate:.2f}x the scoring time of one model, "
        f"{extra_ms:.2f} ms more per item"
    )
    print(
        json.dumps(
            {
                "benchmark": "reward",
                "size": args.size,
                "items": args.items,
                "request_items": args.request_items,
                "concurrency": args.concurrency,
                "max_batch_size": args.max_batch_size,
                "raw_items_per_s": round(raw_rate, 1),
                "local_items_per_s": round(local_rate, 1),
                "handle_items_per_s": round(handle_rate, 1),
                "http_items_per_s": round(http_rate, 1),
                "handle_over_raw": round(handle_rate / raw_rate, 3),
                "http_over_raw": round(http_rate / raw_rate, 3),
                "members": args.members,
                "ensemble_items_per_s": round(ensemble_rate, 1),
                "ensemble_cost_ratio": round(handle_rate / ensemble_rate, 3),
                "ensemble_extra_ms_per_item": round(extra_ms, 3),
                "max_abs_score_diff": worst,
            }
        )
    )


if __name__ == "__main__":
    main()
