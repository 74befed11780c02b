"""Rollout throughput and weight-load cost, each against its raw baseline in the same run.

1. Tokens per second of raw vLLM `LLM.generate` in this process versus the same prompts and
   sampling through one `RolloutActor` (a Ray actor), end to end: tokenising, generating,
   building the records and returning them to the caller. Rounds alternate between the two
   so that load from other processes hits both alike; the medians are compared.
2. Long-tailed generation (`--only long-tail`): one engine through responses of 4 to 256
   tokens (lengths fixed, EOS ignored), raw `LLM.generate` a call at a time against
   `actors/continuous.py` keeping the engine full; and (`--only actor-tail`) one rollout
   actor on the loop benchmark's long-tailed workload, as the policy samples it: `generate`
   a call at a time against `collect` kept full, with the engine's occupancy.
3. One weight sync as the actor pays it, versus a plain memory copy of the same bytes, for
   each asset size asked for: the learner's publish (tensors and probes into the object
   store), the actor's load (fetch, copy into the live engine) and its verification (the
   engine's probes against the published ones). `direct_loads` in the JSON counts the loads
   that rebuilt the CPU kernels themselves instead of going through vLLM's reload.

    .venv/bin/python benchmarks/rollout.py [--prompts 64] [--rounds 3] [--load-sizes small base]
                                           [--only throughput|long-tail|actor-tail|loads]

Prints a table and, as its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
# The raw baseline gets the threads Ray gives the actor (num_cpus=1): the comparison is then
# of the code paths, not of thread counts. (On 2 busy cores, 2 OpenMP threads that spin at
# their barriers also run several times slower than one.)
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cluster.shared.config import TameConfig  # noqa: E402
from cluster.shared.records import Prompt  # noqa: E402
from cluster.shared.transport import ObjectStoreTransport  # noqa: E402


def make_config(policy: Path, max_new_tokens: int, prompts_per_batch: int = 32) -> TameConfig:
    return TameConfig.model_validate(
        {
            # Nothing is scored here; the config still needs something to score with.
            "model": {"policy": str(policy), "reward": None},
            "learner": {"critic": "policy"},
            "reward": {"functions": [{"function": "cluster.demo.world:gold_reward"}]},
            "rollout": {
                "num_cpus": 1,
                "prompts_per_batch": prompts_per_batch,
                "max_model_len": 512,
                "kv_cache_gib": 1.0,
                "sampling": {"max_new_tokens": max_new_tokens},
            },
        }
    )


def load_prompts(path: Path, n: int) -> list[Prompt]:
    prompts = []
    with path.open() as f:
        for i, line in enumerate(f):
            if i == n:
                break
            row = json.loads(line)
            messages = (
                tuple((m["role"], m["content"]) for m in row["messages"])
                if "messages" in row
                else (("user", row["prompt"]),)
            )
            prompts.append(Prompt(f"0:{i}", messages))
    return prompts


def memcpy_seconds(nbytes: int, repeats: int = 5) -> float:
    """Best time of one single-threaded copy of `nbytes` between two warm buffers."""
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return best


def throughput(args, assets_root: Path, ray) -> dict:
    from transformers import AutoTokenizer

    from actors.engine import build_engine, encode_prompts, run_generate, sampling_params
    from actors.rollout import RolloutActor
    from cluster.demo.assets import ensure_assets

    assets = ensure_assets(assets_root / "small", "small", seed=0)
    cfg = make_config(assets.policy, args.max_new_tokens)
    prompts = load_prompts(assets.data / "prompts.jsonl", args.prompts)

    # (a) raw vLLM in this process, on already tokenised prompts, with the same sampling.
    llm = build_engine(cfg, seed=cfg.run.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy)
    prompt_ids = encode_prompts(tokenizer, prompts, cfg.data.chat_template, cfg.rollout.max_model_len)
    params = sampling_params(cfg)
    run_generate(llm, prompt_ids, params)  # warm-up

    # (b) one rollout actor, as the cluster makes it.
    actor = ray.remote(num_cpus=cfg.rollout.num_cpus)(RolloutActor).remote(cfg, 0)
    ray.get(actor.ready.remote())
    ray.get(actor.generate.remote(prompts))  # warm-up

    raw, wrapped = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        outputs = run_generate(llm, prompt_ids, params)
        seconds = time.perf_counter() - start
        raw.append(sum(len(c.token_ids) for o in outputs for c in o.outputs) / seconds)

        start = time.perf_counter()
        batch = ray.get(actor.generate.remote(prompts))
        seconds = time.perf_counter() - start
        wrapped.append(batch.generated_tokens / seconds)
    ray.kill(actor)
    del llm
    return {
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "raw_tokens_per_s": statistics.median(raw),
        "actor_tokens_per_s": statistics.median(wrapped),
        "ratio": statistics.median(wrapped) / statistics.median(raw),
        "raw_rounds": raw,
        "actor_rounds": wrapped,
    }


def tail_lengths(n: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """Long-tailed response lengths: log-uniform from a word (`shortest` tokens) to
    `longest`, so the median response is their geometric mean and a few run to the cap."""
    rng = np.random.default_rng(seed)
    return [int(round(shortest * (longest / shortest) ** u)) for u in rng.random(n)]


def long_tail(args, assets_root: Path) -> dict:
    """One engine, three ways through the same long-tailed workload (`tail_lengths`, each
    response's length fixed by its own max_tokens with EOS ignored): raw `LLM.generate` a call
    of `--tail-slots` prompts at a time, as the rollout actor generates; the same calls through
    `Continuous` (add a call, step until it ends); and `Continuous` keeping `--tail-slots`
    prompts in flight, adding one as soon as one ends. Rounds alternate; medians."""
    from transformers import AutoTokenizer

    from actors.continuous import Continuous
    from actors.engine import build_engine, encode_prompts, run_generate, sampling_params
    from cluster.demo.assets import ensure_assets

    assets = ensure_assets(assets_root / "small", "small", seed=0)
    cfg = make_config(assets.policy, args.tail_max_new_tokens)
    n = args.tail_prompts
    prompts = (load_prompts(assets.data / "prompts.jsonl", n) * n)[:n]
    llm = build_engine(cfg, seed=cfg.run.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy)
    prompt_ids = encode_prompts(tokenizer, prompts, cfg.data.chat_template, cfg.rollout.max_model_len)
    base = sampling_params(cfg)
    base.n = 1  # one sample a prompt: each response has its own length
    lengths = tail_lengths(n, 4, args.tail_max_new_tokens)
    params = [base.clone() for _ in lengths]
    for p, length in zip(params, lengths):
        p.max_tokens, p.ignore_eos = length, True
    slots = args.tail_slots
    calls = [range(i, min(i + slots, n)) for i in range(0, n, slots)]

    def raw() -> tuple[int, None]:
        made = 0
        for call in calls:
            outputs = llm.generate(
                [{"prompt_token_ids": prompt_ids[i]} for i in call], [params[i] for i in call], use_tqdm=False
            )
            made += sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return made, None

    def stepped(refill: bool) -> tuple[int, float]:
        engine = Continuous(llm, base)
        waiting = list(range(n))
        while waiting or engine.sequences:
            if refill or not engine.sequences:
                room = slots - engine.prompts if refill else min(slots, len(waiting))
                for i in waiting[:room]:
                    engine.add(prompts[i], prompt_ids[i], 0, params=params[i])
                waiting = waiting[room:]
            engine.step(0)
        return engine.occupancy.tokens, engine.occupancy.mean

    modes = {"raw_calls": raw, "stepped_calls": lambda: stepped(False), "continuous": lambda: stepped(True)}
    run_generate(llm, prompt_ids[:2], base)  # warm-up
    seen: dict[str, list[tuple[float, float | None]]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, mode in modes.items():
            start = time.perf_counter()
            tokens, occupancy = mode()
            seen[name].append((tokens / (time.perf_counter() - start), occupancy))
            assert tokens == sum(lengths), (name, tokens, sum(lengths))
    out = {
        "prompts": n,
        "slots": slots,
        "max_new_tokens": args.tail_max_new_tokens,
        "tokens": sum(lengths),
        "median_length": float(np.median(lengths)),
        "rounds": args.rounds,
    }
    for name, values in seen.items():
        out[f"{name}_tokens_per_s"] = statistics.median(v[0] for v in values)
        if values[0][1] is not None:
            out[f"{name}_occupancy"] = statistics.median(v[1] for v in values)
    out["continuous_over_calls"] = out["continuous_tokens_per_s"] / out["raw_calls_tokens_per_s"]
    return out


def actor_tail(args, assets_root: Path, ray) -> dict:
    """One rollout actor on the loop benchmark's long-tailed workload (`benchmarks/loop.py`'s
    early-SFT policy: responses from one token to the cap, as the policy samples them, each
    prompt's group ending with its longest sample): `generate` a call of `--tail-slots`
    prompts at a time, as the actors generated before continuous generation, against `collect`
    keeping `--tail-slots` prompts in flight, as the loop drives it now. Rounds alternate;
    medians. Occupancy is the actor's own count of sequences per engine step."""
    from loop import WORKLOADS, early_sft

    from actors.rollout import RolloutActor
    from cluster.demo.assets import ensure_assets

    assets = ensure_assets(assets_root / "small", "small", seed=0)
    policy = early_sft(assets.root, log=lambda m: print(m, file=sys.stderr, flush=True))
    slots, n = args.tail_slots, args.tail_prompts
    cfg = make_config(policy, WORKLOADS["long-tail"], prompts_per_batch=slots)
    prompts = load_prompts(assets.data / "prompts.jsonl", n)
    actor = ray.remote(num_cpus=cfg.rollout.num_cpus)(RolloutActor).remote(cfg, 0)
    ray.get(actor.generate.remote(prompts[:slots]))  # warm-up

    def calls() -> list:
        return [ray.get(actor.generate.remote(prompts[i : i + slots])) for i in range(0, n, slots)]

    def kept_full() -> list:
        waiting, held, batches = list(prompts), 0, []
        while waiting or held:
            new, waiting = waiting[: slots - held], waiting[slots - held :]
            batches.append(ray.get(actor.collect.remote(new)))
            held += len(new) - len(batches[-1].prompt_ids)
        return batches

    seen: dict[str, list[tuple[float, float, float]]] = {"calls": [], "kept_full": []}
    for _ in range(args.rounds):
        for name, mode in (("calls", calls), ("kept_full", kept_full)):
            start = time.perf_counter()
            batches = mode()
            seconds = time.perf_counter() - start
            tokens = sum(b.generated_tokens for b in batches)
            assert sum(len(b.prompt_ids) for b in batches) == n, name
            occupancy = sum(b.engine_sequences for b in batches) / sum(b.engine_steps for b in batches)
            seen[name].append((tokens / seconds, occupancy, tokens / (n * cfg.rollout.sampling.samples_per_prompt)))
    ray.kill(actor)
    out = {"prompts": n, "slots": slots, "samples_per_prompt": cfg.rollout.sampling.samples_per_prompt}
    out["max_new_tokens"], out["rounds"] = cfg.rollout.sampling.max_new_tokens, args.rounds
    for name, values in seen.items():
        out[f"{name}_tokens_per_s"] = statistics.median(v[0] for v in values)
        out[f"{name}_occupancy"] = statistics.median(v[1] for v in values)
        out[f"{name}_mean_length"] = statistics.median(v[2] for v in values)
        out[f"{name}_rounds"] = [round(v[0]) for v in values]
    out["kept_full_over_calls"] = out["kept_full_tokens_per_s"] / out["calls_tokens_per_s"]
    return out


def weight_load(size: str, assets_root: Path, loads: int, ray) -> dict:
    from safetensors.torch import load_file

    from actors.rollout import RolloutActor
    from cluster.demo.assets import ensure_assets

    assets = ensure_assets(assets_root / size, size, seed=0)
    cfg = make_config(assets.policy, 8)
    actor = ray.remote(num_cpus=cfg.rollout.num_cpus)(RolloutActor).remote(cfg, 0)
    ray.get(actor.ready.remote())
    state = load_file(assets.policy / "model.safetensors")
    transport = ObjectStoreTransport()  # as the learner publishes: one thread here, as Ray gives it

    results, publish = [], []
    for version in range(1, loads + 1):
        perturbed = {k: v + 1e-3 * version for k, v in state.items()}
        start = time.perf_counter()
        handle = transport.publish(perturbed.items(), version)
        publish.append(time.perf_counter() - start)
        result = ray.get(actor.load_weights.remote(handle))
        if not result.verified:
            raise RuntimeError(f"{size}: version {version} not verified: {result.problem}")
        results.append(result)
        del handle
    ray.kill(actor)

    nbytes = results[0].bytes
    copy = memcpy_seconds(nbytes)
    # The first versions pay one-off costs: the engine's first reload allocates, and the object
    # store hands out fresh (not yet faulted-in) memory until it has cycled through its size.
    # The steady state, the second half of the loads, is what a long run sees.
    steady = results[loads // 2 :]
    pick = lambda key: statistics.median(getattr(r, key) for r in steady)  # noqa: E731
    publish_s = statistics.median(publish[loads // 2 :])
    load_s = pick("seconds") - pick("verify_seconds")
    sync_s = publish_s + pick("seconds")
    return {
        "size": size,
        "bytes": nbytes,
        "loads": loads,
        "publish_seconds": publish_s,
        "load_seconds": load_s,
        "first_sync_seconds": publish[0] + results[0].seconds,
        "fetch_seconds": pick("fetch_seconds"),
        "reload_seconds": pick("reload_seconds"),
        "verify_seconds": pick("verify_seconds"),
        "probe_rms_error": max(r.probe_rms_error for r in results),
        "direct_loads": sum(r.direct for r in results),
        "sync_seconds": sync_s,
        "memcpy_seconds": copy,
        "ratio_to_memcpy": sync_s / copy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--assets", default="runs/assets", help="folder holding the <size>/ assets (built when missing)"
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", type=int, default=10, help="weight syncs per size (the second half is timed)")
    parser.add_argument("--load-sizes", nargs="*", default=["small", "base"])
    parser.add_argument("--tail-prompts", type=int, default=128, help="prompts of the long-tailed workload")
    parser.add_argument("--tail-slots", type=int, default=32, help="prompts per call, or in flight when continuous")
    parser.add_argument("--tail-max-new-tokens", type=int, default=256)
    parser.add_argument("--only", choices=["throughput", "long-tail", "actor-tail", "loads"], help="run one part alone")
    args = parser.parse_args()

    import ray

    # A 2 GB object store cycles through its memory within the benchmark's syncs (see
    # weight_load); a run with the default store gets there after store size / version size
    # versions.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=2 * 10**9,
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}},
    )
    root = Path(args.assets)
    gen = throughput(args, root, ray) if args.only in (None, "throughput") else None
    tail = long_tail(args, root) if args.only in (None, "long-tail") else None
    actor = actor_tail(args, root, ray) if args.only in (None, "actor-tail") else None
    sizes = args.load_sizes if args.only in (None, "loads") else []
    loads = [weight_load(size, root, args.loads, ray) for size in sizes]
    ray.shutdown()

    if gen is not None:
        print()
        print(
            f"generation, small assets, {gen['prompts']} prompts x {gen['max_new_tokens']} new tokens, "
            f"median of {gen['rounds']} rounds"
        )
        print(f"  {'path':<28}{'tokens/s':>12}")
        print(f"  {'raw vLLM LLM.generate':<28}{gen['raw_tokens_per_s']:>12.0f}")
        print(f"  {'RolloutActor.generate':<28}{gen['actor_tokens_per_s']:>12.0f}")
        print(f"  {'actor / raw':<28}{gen['ratio']:>12.3f}   (target >= 0.95)")
    if tail is not None:
        print()
        print(
            f"long-tailed generation, small assets, {tail['prompts']} prompts of 4 to {tail['max_new_tokens']} "
            f"tokens (median {tail['median_length']:.0f}), {tail['slots']} at a time, median of {tail['rounds']} rounds"
        )
        print(f"  {'path':<34}{'tokens/s':>10}{'sequences/step':>16}")
        for name, label in (
            ("raw_calls", "raw LLM.generate, call at a time"),
            ("stepped_calls", "Continuous, call at a time"),
            ("continuous", "Continuous, kept full"),
        ):
            occupancy = tail.get(f"{name}_occupancy")
            shown = "" if occupancy is None else f"{occupancy:.1f}"
            print(f"  {label:<34}{tail[f'{name}_tokens_per_s']:>10.0f}{shown:>16}")
        print(f"  {'kept full / raw calls':<34}{tail['continuous_over_calls']:>10.2f}   (target >= 1.3)")
    if actor is not None:
        print()
        print(
            f"one RolloutActor on the loop's long-tailed workload (early-SFT small policy, {actor['prompts']} prompts "
            f"x {actor['samples_per_prompt']} samples, at most {actor['max_new_tokens']} tokens), {actor['slots']} "
            f"prompts at a time, median of {actor['rounds']} rounds"
        )
        print(f"  {'path':<34}{'tokens/s':>10}{'sequences/step':>16}{'mean tokens':>13}")
        for name, label in (("calls", "generate, a call at a time"), ("kept_full", "collect, kept full")):
            print(
                f"  {label:<34}{actor[f'{name}_tokens_per_s']:>10.0f}{actor[f'{name}_occupancy']:>16.1f}"
                f"{actor[f'{name}_mean_length']:>13.1f}"
            )
        print(f"  {'kept full / calls':<34}{actor['kept_full_over_calls']:>10.2f}   (target >= 1.3)")
    if loads:
        print()
        print("one weight sync as the actor pays it (median of the warm ones) vs one memcpy of the same bytes")
        print(
            f"  {'size':<6}{'MB':>8}{'publish s':>10}{'load s':>9}{'verify s':>9}{'sync s':>9}{'memcpy s':>10}"
            f"{'sync/memcpy':>12}{'reload s':>10}{'probe err':>11}"
        )
    for r in loads:
        print(
            f"  {r['size']:<6}{r['bytes'] / 1e6:>8.1f}{r['publish_seconds']:>10.4f}{r['load_seconds']:>9.4f}"
            f"{r['verify_seconds']:>9.4f}{r['sync_seconds']:>9.4f}{r['memcpy_seconds']:>10.4f}"
            f"{r['ratio_to_memcpy']:>12.1f}{r['reload_seconds']:>10.4f}{r['probe_rms_error']:>11.1e}"
        )
    print(json.dumps({"generation": gen, "long_tail": tail, "actor_tail": actor, "weight_load": loads}))


if __name__ == "__main__":
    main()
