"""The `tame` command line.

Exit codes: 0 success; 2 bad usage, config or data (the message names the field, file and
line); 1 a failure at run time. Heavy imports (torch, ray, vllm) happen inside the command
that needs them, so `tame config ...` and every config error answer within a second or two.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from cluster.demo.world import HELDOUT_SPLITS
from cluster.shared.config import MAX_ACTORS, TameConfig, schema_json
from cluster.shared.config_file import load_config
from cluster.shared.errors import RunError, UserError
from cluster.shared.hf_folder import check_model_folder
from cluster.shared.reward_folder import check_reward_folder

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def log(message: str) -> None:
    """Progress lines for long work, on stderr so stdout stays machine-readable."""
    _console().print(f"[bold cyan]tame[/] {message}")


def _config(args) -> TameConfig:
    """The config with the checks the command needs (`tame config show` checks what `tame
    train` would)."""
    command = args.command if args.command in ("sft", "train-rm") else "train"
    return load_config(args.config, args.set or [], command=command)


# --------------------------------------------------------------------------- commands


def cmd_config(args) -> int:
    if args.action == "schema":
        print(schema_json())
    else:
        print(_config(args).to_yaml(), end="")
    return EXIT_OK


def cmd_assets(args) -> int:
    from cluster.demo.assets import build_assets

    build_assets(args.out, args.size, args.seed, log=log, family=args.family)
    return EXIT_OK


def _no_resume(args) -> None:
    if args.resume:
        raise UserError(
            f"--resume: `tame {args.command}` is short and restarts from its init model; "
            f"only `tame train` resumes from checkpoints"
        )


def _stage(args, run) -> object:
    """Stage 1 or 2 (`tame sft`, `tame train-rm`): `run(cfg, log=...)` on the config, its
    offline assets built first when it asks for them."""
    _no_resume(args)
    cfg = _config(args)
    _prepare_models(cfg)
    return run(cfg, log=log)


def cmd_sft(args) -> int:
    from learner.sft import run_sft

    log(f"SFT policy saved to {_stage(args, run_sft)}")
    return EXIT_OK


def cmd_train_rm(args) -> int:
    from reward_service.train import train_reward_model

    # The options are shortcuts for their config keys, so the run's config says what was trained.
    if args.members is not None:
        args.set = [*(args.set or []), f"reward_model.members={args.members}"]
    if args.bootstrap:
        args.set = [*(args.set or []), "reward_model.bootstrap=true"]
    result = _stage(args, train_reward_model)
    if "members" in result:
        each = ", ".join(f"{name} {m['accuracy']:.3f}" for name, m in result["members"].items())
        log(
            f"reward-model ensemble saved to {result['output']}: held-out pairwise accuracy {each}; "
            f"ensemble (mean) {result['accuracy']:.3f}"
        )
    else:
        log(f"reward model saved to {result['output']}: held-out pairwise accuracy {result['accuracy']:.3f}")
    return EXIT_OK


def cmd_train(args) -> int:
    cfg = _config(args)
    from cluster.train import train

    _prepare_models(cfg)
    train(cfg, resume=args.resume, log=log)
    return EXIT_OK


def cmd_plan(args) -> int:
    cfg = _config(args)
    from cluster.checks import host_memory
    from cluster.plan import check

    check_model_folder("model.policy", cfg.model.policy, "causal LM")
    if cfg.model.reward is not None:
        check_reward_folder("model.reward", cfg.model.reward)
    print(check(cfg, host_memory(cfg)).render())
    return EXIT_OK


def cmd_export(args) -> int:
    """A checkpoint's policy as one Hugging Face model folder: a LoRA adapter merged into its
    base, in the base's dtype; a full policy copied as it is."""
    import shutil

    from cluster.shared.files import move_into_place, temporary_sibling

    policy = Path(args.checkpoint) / "policy"
    adapter = policy / "adapter_config.json"
    if not policy.is_dir():
        raise UserError(f"{args.checkpoint}: not a tame checkpoint (no policy/ folder)")
    base = args.base
    if adapter.is_file() and base is None:
        import json

        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if adapter.is_file():
        check_model_folder("--base", base or "", "causal LM")
    tmp = temporary_sibling(args.out)
    try:
        if adapter.is_file():
            from cluster.shared.hf_folder import checkpoint_dtype
            from learner.lora import merge

            log(f"merging the adapter at {policy} into {base}")
            merge(policy, base, tmp, checkpoint_dtype(base))
        else:
            shutil.copytree(policy, tmp, dirs_exist_ok=True)
        move_into_place(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {args.out}")
    return EXIT_OK


def cmd_serve_reward(args) -> int:
    from reward_service.rewards import check_reward_config
    from reward_service.service import serve_forever

    overrides = list(args.set or [])
    overrides.append(f"model.reward={args.model}")
    overrides.append(f"reward.host={args.host}")
    if args.port is not None:
        overrides.append(f"reward.port={args.port}")
    if args.replicas is not None:
        overrides.append(f"reward.replicas={args.replicas}")
    cfg = load_config(args.config, overrides, command="serve-reward")
    check_reward_folder("--model", args.model)
    check_reward_config(cfg)  # before Ray starts, which takes seconds
    serve_forever(cfg)
    return EXIT_OK


def cmd_scale(args) -> int:
    from cluster.control import scale

    if args.actors is not None and not 0 <= args.actors <= MAX_ACTORS:
        raise UserError(f"--actors {args.actors}: the pool size must be between 0 and {MAX_ACTORS}")
    now = scale(args.actors, run=args.run, address=args.address)
    auto, pending = now.get("autoscale"), now.get("pending")
    said = (
        f"{now['num_actors']} rollout actors asked for, {now.get('live_actors', '?')} in the pool"
        if args.actors is None
        else f"rollout pool resized to {now['num_actors']} actors"
    )
    log(f"run {now['run']}: {said}" + (f"; {pending}. The run goes on with the actors that are up" if pending else ""))
    if auto:
        state = "on" if auto["on"] and args.actors is None else "off (`tame scale --actors` set the size)"
        log(
            f"rollout.autoscale {state}, between {auto['min_actors']} and {auto['max_actors']} actors; "
            f"last decision: {auto['last_decision'] or 'none yet'}"
        )
    return EXIT_OK


def cmd_demo(args) -> int:
    from cluster.demo.run import run_demo, run_seeds

    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: must be at least 1")
    if args.seeds == 1:
        run_demo(out=Path(args.out), size=args.size, overrides=args.set or [], log=log, split=args.eval)
    else:
        run_seeds(Path(args.out), args.seeds, size=args.size, overrides=args.set or [], log=log, split=args.eval)
    return EXIT_OK


def _prepare_models(cfg: TameConfig) -> None:
    """Build the offline assets a config asks for (model.build_assets) when they are missing."""
    if cfg.model.build_assets is None:
        return
    from cluster.demo.assets import ensure_assets

    root = Path(cfg.model.policy).parent
    ensure_assets(root, cfg.model.build_assets, cfg.run.seed, log=log)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tame",
        description="Distributed RLHF: vLLM rollout actors, a Ray Serve reward service and a "
        "PPO learner on Ray. Stages: `tame sft`, `tame train-rm`, `tame train` (PPO).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def training(name: str, help: str):
        s = sub.add_parser(name, help=help, description=help)
        s.add_argument("--config", required=True, help="YAML config file (see `tame config schema`)")
        s.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override one config value, e.g. --set ppo.kl.coef=0.1 (repeatable)",
        )
        s.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of the run")
        return s

    s = sub.add_parser("demo", help="the whole pipeline (SFT, reward model, PPO) on the synthetic task")
    s.add_argument("--out", default="runs/demo", help="folder for the demo's models and runs")
    s.add_argument("--size", default="small", choices=["tiny", "small", "base"], help="model size")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a PPO config value")
    s.add_argument(
        "--eval",
        default="test",
        choices=HELDOUT_SPLITS,
        help="the half of the held-out prompts to judge: validation to choose a recipe, test to report",
    )
    s.add_argument(
        "--seeds", type=int, default=1, help="run the demo for N seeds (run.seed up) and report mean and range"
    )
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("assets", help="build the offline tokenizer, policy, reward model and demo data")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument(
        "--size",
        default="tiny",
        choices=["tiny", "small", "base"],
        help="tiny for tests, small (3.6M parameters) for the demo, base (86M) for benchmarks",
    )
    s.add_argument(
        "--family",
        default="llama",
        choices=["llama", "qwen2"],
        help="model architecture and tokenizer: llama (the demo's), or qwen2 (q/k/v biases, "
        "grouped-query attention, untied LM head, Qwen2's tokenizer)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    s.set_defaults(func=cmd_assets)

    training("sft", "stage 1: supervised fine-tuning on demonstrations").set_defaults(func=cmd_sft)
    s = training("train-rm", "stage 2: train a reward model (or an ensemble of them) on preference pairs")
    s.add_argument(
        "--members",
        type=int,
        metavar="K",
        help="train an ensemble of K reward models, seeds run.seed + i, into <output>/member-<i>/ with "
        "<output>/ensemble.json (reward_model.members; default 1: one reward model)",
    )
    s.add_argument(
        "--bootstrap",
        action="store_true",
        help="train each member on a bootstrap resample of the training pairs (reward_model.bootstrap)",
    )
    s.set_defaults(func=cmd_train_rm)
    training("train", "stage 3: PPO with the actor-learner loop on Ray").set_defaults(func=cmd_train)

    s = sub.add_parser(
        "plan",
        help="the memory each process of a run would hold, checked against its device",
        description="Print what every learner worker, rollout actor and reward replica of a "
        "`tame train` run would hold, from the config and each model's config.json alone; exit 2 "
        "when one would not fit (cluster.gpu_memory_gib, or this machine's memory on a CPU).",
    )
    s.add_argument("--config", required=True, help="YAML config file (see `tame config schema`)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser(
        "export",
        help="write a checkpoint's policy as one Hugging Face model (a LoRA adapter merged into its base)",
    )
    s.add_argument("checkpoint", help="a checkpoint folder, <run>/checkpoints/version-NNNNNN")
    s.add_argument("--out", required=True, help="the model folder to write")
    s.add_argument("--base", help="the LoRA adapter's base model (default: the one its adapter_config.json names)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("serve-reward", help="serve a reward model over HTTP (POST /v1/score) until interrupted")
    s.add_argument(
        "--model", required=True, help="Hugging Face sequence-classification folder, or a reward-model ensemble folder"
    )
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default from the config, 8000)")
    s.add_argument("--replicas", type=int, help="Serve replicas")
    s.add_argument("--config", help="optional YAML config for the reward section")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    s.set_defaults(func=cmd_serve_reward)

    s = sub.add_parser("scale", help="resize the rollout pool of a running `tame train` job, or show it")
    s.add_argument(
        "--actors", type=int, help="the new number of rollout actors (turns rollout.autoscale off); none: show the pool"
    )
    s.add_argument("--run", help="run name (default: the only running one)")
    s.add_argument("--address", help="Ray address (default RAY_ADDRESS or the local cluster)")
    s.set_defaults(func=cmd_scale)

    s = sub.add_parser("config", help="print the resolved config or its JSON schema")
    s.add_argument("action", choices=["show", "schema"])
    s.add_argument("--config", help="YAML config file (defaults only when omitted)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    s.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"tame {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as e:  # a run that cannot go on; its message names the newest checkpoint
        print(f"tame {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as e:
        print(f"tame {args.command}: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)  # 130 for SIGINT, 143 for SIGTERM


if __name__ == "__main__":
    sys.exit(main())
