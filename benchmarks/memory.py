"""What does each learner worker hold, at 1 and at 2 workers, and does `tame plan` say so?

For each model, in one run: a learner (policy, frozen reference and a critic: GAE) of
`learner.num_workers` 1, then 2 (FSDP2 over gloo, each worker a Ray actor), and for each
worker process its peak resident memory (the kernel's high-water mark, VmHWM, reset
between phases through /proc/PID/clear_refs):
- start-up: from the process's start to the learner built (models loaded, sharded);
- update: one PPO update after a first one (AdamW's states exist from the first step on,
  so the second is what every later update costs);
  The update ends by publishing the new version: rank 0 gathers the policy and writes the
  object store's copy, shared memory Ray holds once per node whatever the number of workers.
  That copy is set apart (`update`, which the plan predicts); `update with the store's copy`
  is the whole high-water mark.
Beside each, the plan's prediction for the same config (`cluster.plan`), and their ratio.

Models: a Qwen2-architecture policy of about 0.3B parameters (Qwen's vocabulary, untied
head, random weights saved in bfloat16 as real checkpoints are; the critic is made from it),
and the `base` assets (a 90M Llama, float32, the critic from its reward model). One update
is 4 rows of 128 tokens (16 prompt, 112 response) in micro-batches of 2 rows, one optimizer
step. The last line is one JSON object.

    .venv/bin/python benchmarks/memory.py [--models qwen2-0.3b,base]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.demo.assets import ensure_assets  # noqa: E402
from cluster.launch import start_learner  # noqa: E402
from cluster.shared.config_file import load_config  # noqa: E402
from cluster.shared.records import Rollout  # noqa: E402

ROOT = Path("runs/benchmark-memory")
PROMPT_TOKENS, RESPONSE_TOKENS, ROWS, MICRO = 16, 112, 4, 2
QWEN2_03B = dict(
    vocab_size=151936,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
"""Qwen2.5's shape (grouped-query attention, q/k/v biases, untied head, its vocabulary), narrowed."""


def qwen2_policy() -> Path:
    """The Qwen2-architecture policy, built once (random weights, a Qwen2 tokenizer)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cluster.demo.assets import build_qwen2_tokenizer, save_tokenizer

    folder = ROOT / "qwen2-0.3b"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = build_qwen2_tokenizer(4096, seed=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(**QWEN2_03B, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    )
    model.to(torch.bfloat16).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


def overrides(name: str) -> list[str]:
    """The config of each model's learner: GAE, one optimizer step per update."""
    common = [
        f"train.rollout_batch_size={ROWS}",
        f"ppo.minibatch_size={ROWS}",
        f"ppo.micro_batch_size={MICRO}",
        f"rollout.sampling.max_new_tokens={RESPONSE_TOKENS}",
        f"data.max_prompt_tokens={PROMPT_TOKENS}",
        "learner.num_cpus=1",
        "learner.threads=2",
        f"run.output_dir={ROOT / 'runs'}",
    ]
    if name == "base":
        assets = ensure_assets("runs/assets/base", "base", seed=0, log=lambda *_: None)
        return [f"model.policy={assets.policy}", f"model.reward={assets.reward}", *common]
    return [
        f"model.policy={qwen2_policy()}",
        "model.reward=null",
        "learner.critic=policy",
        "reward.functions=[{function: 'tests.faults:gold_unless_poisoned', weight: 1.0}]",
        *common,
    ]


def rollouts(vocab: int) -> list[Rollout]:
    rng = random.Random(0)
    out = []
    for i in range(ROWS):
        prompt = [rng.randrange(10, vocab) for _ in range(PROMPT_TOKENS)]
        response = [rng.randrange(10, vocab) for _ in range(RESPONSE_TOKENS)]
        out.append(
            Rollout(
                f"0:{i}", 0, "", prompt, response, "", [-5.0] * RESPONSE_TOKENS, "length", 0, 0, 0.0, score=rng.random()
            )
        )
    return out


def _peak_and_reset(_self=None) -> int:
    """This process's peak resident bytes since the last reset; resets it."""
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak


def peaks(learner) -> list[int]:
    """Each worker's peak since the last call, rank 0 first."""
    import ray

    mine = learner.__ray_call__.remote(_peak_and_reset)
    others = learner.__ray_call__.remote(
        lambda self: ray.get([w.__ray_call__.remote(_peak_and_reset) for w in getattr(self, "workers", [])])
    )
    return [ray.get(mine), *ray.get(others)]


def measure(name: str, workers: int) -> dict:
    import ray
    from ray.util.placement_group import remove_placement_group

    from cluster.plan import learner_worker

    cfg = load_config(None, [*overrides(name), f"learner.num_workers={workers}", f"run.name={name}-w{workers}"])
    learner, group = start_learner(cfg)
    ray.get(learner.__ray_ready__.remote())
    startup = peaks(learner)
    vocab = ray.get(learner.__ray_call__.remote(lambda self: len(self.tokenizer)))
    batch = rollouts(vocab)
    ray.get(learner.update.remote(batch))
    peaks(learner)
    published = ray.get(learner.update.remote(batch)).weights.nbytes
    update = peaks(learner)
    ray.kill(learner)
    if group is not None:
        remove_placement_group(group)
    plan = learner_worker(cfg)
    # Rank 0 writes the object store's copy of the version it publishes: shared memory in its
    # resident set, which Ray holds once per node whatever the number of workers.
    return {
        "startup": startup,
        "update": [update[0] - published, *update[1:]],
        "update_raw": update,
        "plan_startup": plan.startup_bytes,
        "plan_update": plan.update_bytes,
        "plan": plan,
    }


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen2-0.3b,base")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    out: dict = {"benchmark": "memory"}
    gib = 2**30
    for name in args.models.split(","):
        results = {w: measure(name, w) for w in (1, 2)}
        print(f"\n{name}: peak resident memory of each learner worker, GiB (plan's prediction; measured / plan)")
        print(results[1]["plan"].render())
        print(f"{'workers':<9}{'rank':>5}{'start-up':>22}{'update':>22}{'update with the store copy':>28}")
        for w, r in results.items():
            for rank in range(w):
                startup, update = r["startup"][rank], r["update"][rank]
                print(
                    f"{w:<9}{rank:>5}"
                    f"{startup / gib:>9.2f} ({r['plan_startup'] / gib:.2f}; {startup / r['plan_startup']:.2f})"
                    f"{update / gib:>9.2f} ({r['plan_update'] / gib:.2f}; {update / r['plan_update']:.2f})"
                    f"{r['update_raw'][rank] / gib:>28.2f}"
                )
        one, two = results[1], results[2]
        startup_ratio = max(two["startup"]) / one["startup"][0]
        update_ratio = max(two["update"]) / one["update"][0]
        raw_ratio = max(two["update_raw"]) / one["update_raw"][0]
        print(
            f"2 workers / 1 worker (the larger worker): start-up {startup_ratio:.2f}x, update {update_ratio:.2f}x "
            f"({raw_ratio:.2f}x with the store's copy)"
        )
        errors = [
            r[phase][rank] / r[f"plan_{phase}"] - 1
            for r in results.values()
            for phase in ("startup", "update")
            for rank in range(len(r[phase]))
        ]
        out[name] = {
            **{
                f"w{w}_{phase}_gib": [round(b / gib, 3) for b in r[phase]]
                for w, r in results.items()
                for phase in ("startup", "update", "update_raw")
            },
            **{
                f"w{w}_plan_{phase}_gib": round(r[f"plan_{phase}"] / gib, 3)
                for w, r in results.items()
                for phase in ("startup", "update")
            },
            "startup_w2_over_w1": round(startup_ratio, 3),
            "update_w2_over_w1": round(update_ratio, 3),
            "update_with_store_copy_w2_over_w1": round(raw_ratio, 3),
            "plan_error_max": round(max(errors, key=abs), 3),
        }
    ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
