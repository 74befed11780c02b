"""How much does the PPO learner add on top of the model passes it cannot avoid?

In one run, on the same sampled tokens (the `small` assets by default):

- `update`: one `Learner.update` (tokens, no-grad passes, rewards, GAE, PPO epochs over
  minibatches and micro-batches, clipping, AdamW, metrics; and publishing the new version
  into the object store, its last step);
- `fwd+bwd`: the bare training passes a plain loop would make over the same micro-batches
  and epochs: policy forward (full logits) + token cross-entropy + backward, and critic
  forward + value MSE + backward, nothing else;
- `no-grad fwd`: the bare forward passes of policy, reference and critic that PPO needs
  once per update (proximal and reference log-probs, old values).

`update / (fwd+bwd + no-grad fwd)` is the cost of the bookkeeping (target: at most 1.2);
`update / fwd+bwd` is shown too. Best of --repeats runs (taken in turns) after one warm-up.
The last line is one JSON object with the figures.

    .venv/bin/python benchmarks/learner.py [--assets runs/assets/small] [--batch 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.demo.assets import ensure_assets  # noqa: E402
from cluster.shared.config_file import load_config  # noqa: E402
from cluster.shared.threads import available_cores  # noqa: E402
from learner.learner import Learner  # noqa: E402
from learner.sampling import sample_rollouts  # noqa: E402


def best_seconds(fns: dict, repeats: int) -> dict[str, float]:
    """Fastest of `repeats` wall-clock runs of each function, run in turns, so that load
    from other processes on a shared machine hits all of them alike and mostly drops out."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: min(ts) for name, ts in times.items()}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", default="runs/assets/small", help="assets folder (built if missing)")
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=32, help="rollouts per update")
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=available_cores())
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the update publishes into its object store

    assets = ensure_assets(args.assets, args.size, seed=0, log=lambda *_: None)
    overrides = [
        f"model.policy={assets.policy}",
        f"model.reward={assets.reward}",
        f"learner.num_cpus={args.threads}",
        f"train.rollout_batch_size={args.batch}",
        f"ppo.minibatch_size={args.minibatch}",
        f"ppo.micro_batch_size={args.micro}",
        f"ppo.epochs={args.epochs}",
        f"rollout.sampling.max_new_tokens={args.new_tokens}",
    ]
    cfg = load_config(None, overrides)
    learner = Learner(cfg, "/tmp/tame-benchmark-learner")
    prompts = [
        json.loads(line)["prompt"] for line in (assets.data / "prompts.jsonl").read_text().splitlines()[: args.batch]
    ]
    rollouts = sample_rollouts(learner.policy, learner.tokenizer, prompts, args.new_tokens)
    for r in rollouts:
        r.score = len(r.response_token_ids) / args.new_tokens
    exp = learner.tokens(rollouts)
    n_tokens = int(exp.attention_mask.sum())
    n_response = int(exp.mask.sum())

    # the bare passes, over the same micro-batches (each padded to its own longest row)
    micro_batches = []
    for rows in torch.arange(args.batch).split(args.micro):
        width = int(exp.attention_mask[rows].sum(1).max())
        micro_batches.append((exp.input_ids[rows, :width], exp.attention_mask[rows, :width]))
    steps = args.epochs * -(-args.batch // args.minibatch)
    micro_per_step = -(-args.minibatch // args.micro)

    def fwd_bwd() -> None:
        for i in range(steps * micro_per_step):
            ids, attention = micro_batches[i % len(micro_batches)]
            logits = learner.policy(input_ids=ids, attention_mask=attention, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            hidden = learner.critic.base_model(
                input_ids=ids, attention_mask=attention, use_cache=False
            ).last_hidden_state
            learner.value_head(hidden).pow(2).mean().backward()
        learner._zero_grad()

    @torch.no_grad()
    def no_grad_fwd() -> None:
        for ids, attention in micro_batches:
            learner.policy(input_ids=ids, attention_mask=attention, use_cache=False)
            learner.reference(input_ids=ids, attention_mask=attention, use_cache=False)
            learner.critic.base_model(input_ids=ids, attention_mask=attention, use_cache=False)

    # GRPO on the same tokens: consecutive rollouts of 4 form a group (for timing only; the
    # tokens are what costs), and the learner holds no critic.
    grpo = Learner(
        load_config(None, [*overrides, "ppo.advantage=grpo", "rollout.sampling.samples_per_prompt=4"]),
        "/tmp/tame-benchmark-learner-grpo",
    )
    grouped = [dataclasses.replace(r, prompt_id=f"0:{i // 4}") for i, r in enumerate(rollouts)]

    fwd_bwd(), no_grad_fwd(), learner.update(rollouts), grpo.update(grouped)  # warm-up
    best = best_seconds(
        {
            "update": lambda: learner.update(rollouts),
            "fwd_bwd": fwd_bwd,
            "no_grad": no_grad_fwd,
            "grpo": lambda: grpo.update(grouped),
        },
        args.repeats,
    )
    t_update, t_fwd_bwd, t_no_grad = best["update"], best["fwd_bwd"], best["no_grad"]
    t_passes = t_fwd_bwd + t_no_grad

    print(
        f"learner benchmark: {args.size} assets, {args.batch} rollouts x {args.epochs} epoch(s), "
        f"minibatch {args.minibatch}, micro-batch {args.micro}, {n_tokens} tokens "
        f"({n_response} response), {learner.threads} threads, best of {args.repeats}"
    )
    print(f"{'what':<44}{'seconds':>10}{'x passes':>10}")
    rows = [
        ("PPO update (Learner.update)", t_update),
        ("GRPO update (no critic)", best["grpo"]),
        ("bare fwd+bwd, policy and critic", t_fwd_bwd),
        ("bare no-grad fwd, policy + reference + critic", t_no_grad),
        ("all bare passes", t_passes),
    ]
    for name, seconds in rows:
        print(f"{name:<44}{seconds:>10.3f}{seconds / t_passes:>10.2f}")
    print(
        f"bookkeeping: update / all bare passes = {t_update / t_passes:.2f} (target <= 1.20); "
        f"update / fwd+bwd = {t_update / t_fwd_bwd:.2f}; GRPO / GAE update = {best['grpo'] / t_update:.2f}"
    )
    print(
        json.dumps(
            {
                "benchmark": "learner",
                "size": args.size,
                "rollouts": args.batch,
                "epochs": args.epochs,
                "tokens": n_tokens,
                "response_tokens": n_response,
                "threads": learner.threads,
                "update_s": round(t_update, 4),
                "fwd_bwd_s": round(t_fwd_bwd, 4),
                "no_grad_fwd_s": round(t_no_grad, 4),
                "update_over_all_passes": round(t_update / t_passes, 3),
                "update_over_fwd_bwd": round(t_update / t_fwd_bwd, 3),
                "grpo_update_s": round(best["grpo"], 4),
                "grpo_over_gae": round(best["grpo"] / t_update, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
