"""What `tame train` checks before it starts anything: the files it was given (models, data,
the checkpoint to resume) and whether the run fits its memory. A mistake found here exits
with code 2 and a message naming the field, file and line, in seconds instead of after the
roles took minutes to start."""

from __future__ import annotations

import threading
from collections.abc import Callable

from cluster.shared.config import TameConfig
from cluster.shared.data import load_prompts
from cluster.shared.errors import ConfigError, UserError
from cluster.shared.hf_folder import check_model_folder
from cluster.shared.reward_folder import check_reward_folder, first_reward_model
from cluster.shared.tokens import require_chat_template


def host_memory(cfg: TameConfig) -> int | None:
    """This machine's memory when every process of the run lives on it: a CPU run on a Ray
    that `tame train` starts here. None otherwise."""
    import psutil

    from cluster.shared.ray_cluster import starts_local

    on_cpu = cfg.learner.device == "cpu" and cfg.rollout.num_gpus == 0 and cfg.reward.num_gpus == 0
    return psutil.virtual_memory().total if on_cpu and starts_local(cfg.cluster.address) else None


def check_start(cfg: TameConfig, resume: bool, log: Callable[[str], None]) -> TokenizerChecks:
    """Everything `tame train` can check before Ray starts. Returns the checks that need the
    policy's tokenizer, running meanwhile: their `check` raises what they found."""
    from cluster.shared.ray_cluster import starts_local
    from cluster.shared.resources import check_local

    checkpoints = cfg.run_dir / "checkpoints"
    if not resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise UserError(
            f"run.name: {cfg.run_dir} already holds checkpoints: pass --resume to continue "
            f"it, or choose another run.name"
        )
    check_inputs(cfg, log)
    if resume:
        check_resumable(cfg)
    if starts_local(cfg.cluster.address):
        check_local(cfg)  # the Ray about to start here: its CPUs are known without starting it
    return TokenizerChecks(cfg)


def check_resumable(cfg: TameConfig) -> None:
    """A GAE run cannot resume from a checkpoint trained without a critic (the other way
    round the critic is just not loaded), nor a sharded learner from a checkpoint written
    before checkpoints were sharded."""
    from learner.checkpoints import SHARDED, complete

    found = complete(cfg.run_dir)
    if not found:
        return
    newest = found[-1]
    # "critic": the folder of the model the learner names so (`Learner.models`).
    if cfg.ppo.advantage == "gae" and not (newest / "critic").is_dir():
        raise UserError(
            f"ppo.advantage: {newest} was trained without a critic (another ppo.advantage "
            "than gae); resume it with the ppo.advantage it was trained with"
        )
    if cfg.learner.num_workers > 1 and not (newest / SHARDED).is_dir():
        raise UserError(
            f"learner.num_workers: {newest} was written by a tame without sharded checkpoints; "
            "resume it with learner.num_workers 1 (its next checkpoint can be resumed with any number)"
        )


def check_inputs(cfg: TameConfig, log: Callable[[str], None] = lambda _: None) -> None:
    """Fail with exit code 2 on missing or wrong-kind inputs, or a run that would not fit
    its memory, before anything starts."""
    from cluster.plan import check
    from reward_service.rewards import check_reward_config

    check_model_folder("model.policy", cfg.model.policy, "causal LM")
    if cfg.model.reward is not None:
        check_reward_folder("model.reward", cfg.model.reward)
    worker = check(cfg, host_memory(cfg)).learner
    log(
        f"memory plan: a learner worker holds {worker.update_bytes / 2**30:.1f} GiB at its update peak "
        f"({worker.budget.source}; `tame plan` has the whole plan)"
    )
    if cfg.data.chat_template:
        require_chat_template(cfg.model.policy, "model.policy")
    check_reward_config(cfg)  # the reward model's folder and template, the rule functions
    load_prompts(cfg.data.prompts)  # names the file and line of a bad record
    if cfg.ppo.ptx_data is not None:
        from learner.data import read_demonstrations

        read_demonstrations(cfg.ppo.ptx_data)


class TokenizerChecks(threading.Thread):
    """What needs the policy's tokenizer, checked in a thread while Ray starts (`check` raises
    what it found): every prompt within `data.max_prompt_tokens`, and leaving the engine room
    for a response (a longer one would fail its generation call mid-run, and again after
    every resume); and a critic made from the reward model, which reads the policy's token
    ids, giving each of them to the same token."""

    def __init__(self, cfg: TameConfig):
        super().__init__(daemon=True, name="tokenizer-checks")
        self.cfg, self.error = cfg, None
        self.start()

    def run(self) -> None:
        from cluster.shared.data import check_prompt_lengths
        from cluster.shared.startup import heavy_imports

        cfg = self.cfg
        try:
            with heavy_imports():
                from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy)
            if cfg.rollout.max_model_len <= cfg.data.max_prompt_tokens:
                limit, key = cfg.rollout.max_model_len - 1, "rollout.max_model_len - 1"
            else:
                limit, key = cfg.data.max_prompt_tokens, "data.max_prompt_tokens"
            check_prompt_lengths(cfg.data.prompts, tokenizer, cfg.data.chat_template, limit, key)
            if cfg.ppo.advantage == "gae" and cfg.learner.critic == "reward" and cfg.model.reward is not None:
                reward_tokenizer = first_reward_model("model.reward", cfg.model.reward)
                reward = AutoTokenizer.from_pretrained(reward_tokenizer).get_vocab()
                if any(reward.get(token) != i for token, i in tokenizer.get_vocab().items()):
                    raise ConfigError(
                        f"learner.critic: 'reward' makes the critic from model.reward ({cfg.model.reward}), which "
                        "would read the policy's token ids, but its tokenizer gives some of them to other tokens "
                        "than model.policy's does: use learner.critic policy"
                    )
        except Exception as e:  # raised in the caller's thread by check()
            self.error = e

    def check(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error
