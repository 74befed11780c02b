"""The sharded learner (learner.num_workers 2: FSDP2 over gloo, two Ray actors) against one
worker, on the tiny assets, in a real Ray: the same update, checkpoints that resume with
2 and with 1 worker, a NaN batch skipped by both, and a run whose worker dies."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from cluster.launch import start_learner
from cluster.shared.records import Rollout
from cluster.shared.transport import ObjectStoreTransport
from learner.learner import Learner
from learner.sharding import share_rows
from tests.runs import SMALL_BATCHES, Run, smoke
from tests.support import bfloat16_copy, process
from tests.test_learner import make_cfg, prompts, sample

ADAM_GAP = 5e-5
"""Largest weight gap allowed between one learner and two after the same update (float32)."""


def test_each_row_goes_to_one_worker_and_every_worker_makes_as_many_passes():
    rows = torch.arange(11)
    for micro, world in [(2, 2), (4, 2), (1, 3), (4, 4)]:
        shares = [list(share_rows(rows, micro, rank, world)) for rank in range(world)]
        assert len({len(s) for s in shares}) == 1  # the same number of passes on every worker
        real = sorted(int(r) for s in shares for part, stand_in in s if not stand_in for r in part)
        assert real == list(range(11))  # every row once
        assert all(len(part) <= micro for s in shares for part, _ in s)
    # 11 rows, micro 4, 2 workers: rounds of 8 and 3 -> worker 1 gets rows 1,3,5,7 and 9.
    assert [p.tolist() for p, _ in share_rows(rows, 4, 1, 2)] == [[1, 3, 5, 7], [9]]
    # 9 rows, micro 2, 4 workers: rounds of 8 and 1; worker 3's share of the second is empty,
    # so it passes that round's row as a stand-in.
    assert [(p.tolist(), s) for p, s in share_rows(torch.arange(9), 2, 3, 4)] == [([3, 7], False), ([8], True)]


def weights(handle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ObjectStoreTransport.fetch(handle).items()}


def hf_weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(f"{path}/policy")
    critic = AutoModelForSequenceClassification.from_pretrained(f"{path}/critic")
    return {
        **{f"policy.{k}": v for k, v in policy.state_dict().items()},
        **{f"critic.{k}": v for k, v in critic.state_dict().items()},
    }


def max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def stop(handle, group) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    ray.kill(handle)
    if group is not None:
        remove_placement_group(group)


def test_two_workers_train_checkpoint_and_resume_as_one(tiny_assets, tmp_path, ray_local):
    import ray

    # Minibatches of 5 over micro-batches of 1: the last minibatch (1 row) gives worker 1 a
    # stand-in pass; 2 epochs, so the non-finite undo path holds snapshots of shards.
    overrides = [
        "learner.num_cpus=1",
        "ppo.epochs=2",
        "ppo.minibatch_size=5",
        "ppo.micro_batch_size=1",
        "ppo.kl.adaptive=true",
        "ppo.lr_schedule=linear",
        "ppo.warmup_steps=2",
        "train.total_updates=4",
    ]
    one_cfg = make_cfg(tiny_assets, *overrides, f"run.output_dir={tmp_path}", "run.name=one")
    two_cfg = make_cfg(tiny_assets, *overrides, f"run.output_dir={tmp_path}", "run.name=two", "learner.num_workers=2")
    sampler = Learner(one_cfg, str(tmp_path / "sampler"))
    batches = [sample(sampler, prompts(tiny_assets, 16, start=16 * i), seed=30 + i) for i in range(2)]
    del sampler

    one = Learner(one_cfg, str(one_cfg.run_dir))  # one worker, in this process
    two, group = start_learner(two_cfg)
    assert len({w["pid"] for w in ray.get(two.places.remote())}) == 2  # two processes

    # One update of the same batch: the same weights (float32 reduction order apart).
    first_two = two.update.remote(batches[0])
    first_one, first_two = one.update(batches[0]), ray.get(first_two)
    assert first_one.version == first_two.version == 1 and not first_two.skipped
    assert first_two.metrics["learner/workers"] == 2
    for key in ("objective/kl", "loss/policy_avg", "loss/value_avg", "policy/grad_norm_avg", "val/ratio"):
        assert math.isclose(first_one.metrics[key], first_two.metrics[key], rel_tol=1e-4, abs_tol=1e-6), key
    handle_one, handle_two = one.publish(), ray.get(two.publish.remote())
    published_v1 = weights(handle_two)
    # Each update published its version as its last step (rank 0's gathers, from both workers).
    assert handle_one is first_one.weights and first_two.weights.version == 1
    assert max_gap(weights(first_two.weights), published_v1) == 0
    # Adam's first step moves each weight by about ppo.learning_rate (2e-3) whatever the size of
    # its gradient, so a gradient within a few eps (1e-8) of zero turns reduction-order bits
    # into weight gaps: up to 1.03e-5 on the AVX2 EPYC, 1/200 of a step. ADAM_GAP allows 1/40.
    assert max_gap(weights(handle_one), published_v1) < ADAM_GAP
    # The critic too, through the Hugging Face exports of both checkpoints.
    path_one, path_two = one.save_checkpoint({}), ray.get(two.save_checkpoint.remote({"cursor": 1}))
    assert max_gap(hf_weights(path_one), hf_weights(path_two)) < ADAM_GAP
    del one

    # The uninterrupted 2-worker run goes on; a fresh 2-worker learner resumes from the
    # checkpoint and trains the same batch: the same bits.
    ray.get(two.update.remote(batches[1]))
    uninterrupted = weights(ray.get(two.publish.remote()))

    # A NaN batch: skipped by both workers together, nothing new published.
    bad = [Rollout(**{**r.__dict__}) for r in batches[0]]
    bad[3].score = float("nan")
    skipped = ray.get(two.update.remote(bad))
    assert skipped.skipped and skipped.version == 2 and skipped.weights is None
    assert ray.get(two.__ray_call__.remote(lambda self: ray.get([w.version.remote() for w in self.workers]))) == [2]
    assert max_gap(weights(ray.get(two.publish.remote())), uninterrupted) == 0
    stop(two, group)

    resumed, group = start_learner(two_cfg)
    assert ray.get(resumed.load_checkpoint.remote()) == {"cursor": 1}
    assert max_gap(weights(ray.get(resumed.publish.remote())), published_v1) == 0
    ray.get(resumed.update.remote(batches[1]))
    assert max_gap(weights(ray.get(resumed.publish.remote())), uninterrupted) == 0

    # Killing rank 0 stops the other worker with it.
    worker = ray.get(resumed.__ray_call__.remote(lambda self: self.workers[0]))
    stop(resumed, group)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(worker.__ray_ready__.remote(), timeout=30)

    # The 2-worker checkpoint into one worker: the same weights.
    single = Learner(one_cfg, str(tmp_path / "single"))
    assert single.load_checkpoint(path_two) == {"cursor": 1}
    assert max_gap(weights(single.publish()), published_v1) < 1e-6


def test_two_workers_write_checkpoints_in_the_background_and_resume_bit_for_bit(tiny_assets, tmp_path, ray_local):
    """learner.async_checkpoints with 2 workers, from a bfloat16 policy: each worker writes its
    shards from a thread (collectives on a group of their own) while the learner trains on;
    rank 0 writes the export, gathered in bfloat16. Loaded back, the checkpoint is the version
    saved, not the one trained since, and the next batch trains to the same bits. (A fresh
    learner resuming a 2-worker checkpoint: test_two_workers_train_checkpoint_and_resume_as_one.)"""
    import ray
    from transformers import AutoModelForCausalLM

    policy = bfloat16_copy(tiny_assets.policy, tmp_path / "bf16")
    cfg = make_cfg(
        tiny_assets,
        f"model.policy={policy}",
        "learner.num_cpus=1",
        "learner.num_workers=2",
        "learner.async_checkpoints=true",
        "ppo.kl.adaptive=true",
        "ppo.lr_schedule=linear",
        f"run.output_dir={tmp_path}",
        "run.name=two",
    )
    sampler = Learner(make_cfg(tiny_assets), str(tmp_path / "sampler"))
    batches = [sample(sampler, prompts(tiny_assets, 16, start=16 * i), seed=50 + i) for i in range(2)]
    del sampler

    two, group = start_learner(cfg)
    ray.get(two.update.remote(batches[0]))
    saved = weights(ray.get(two.publish.remote()))
    path = Path(ray.get(two.save_checkpoint.remote({"cursor": 1})))
    ray.get(two.update.remote(batches[1]))  # while the checkpoint is written
    uninterrupted = weights(ray.get(two.publish.remote()))
    assert ray.get(two.wait_for_checkpoint.remote()) == str(path)

    assert ray.get(two.load_checkpoint.remote()) == {"cursor": 1}
    assert max_gap(weights(ray.get(two.publish.remote())), saved) == 0
    ray.get(two.update.remote(batches[1]))
    assert max_gap(weights(ray.get(two.publish.remote())), uninterrupted) == 0
    stop(two, group)

    exported = AutoModelForCausalLM.from_pretrained(path / "policy", dtype="auto").state_dict()
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert max_gap(exported, {k: v.to(torch.bfloat16) for k, v in saved.items()}) == 0


def test_a_run_whose_learner_worker_dies_ends_naming_its_checkpoint(tiny_assets, ray_local, tmp_path):
    """`tame train` with 2 learner workers; worker 1 is killed (SIGKILL) once a checkpoint
    exists: the run ends with a RunError naming that checkpoint, and no worker lives on."""
    from cluster.controller import RunError

    run = Run(
        smoke(
            tiny_assets,
            tmp_path,
            "run.name=dead-worker",
            "learner.num_workers=2",
            "learner.checkpoint_every=1",
            "train.total_updates=100",
            *SMALL_BATCHES,
        )
    )
    first = run.cfg.run_dir / "checkpoints" / "version-000001" / "trainer_state.pt"
    deadline = time.monotonic() + 180
    while not (first.exists() and run.status().get("learner")) and run.is_alive():
        assert time.monotonic() < deadline, run.logs[-10:]
        time.sleep(0.2)
    workers = run.status()["learner"]["workers"]
    os.kill(workers[1]["pid"], signal.SIGKILL)
    run.join(timeout=120)
    assert isinstance(run.error, RunError), (run.error, run.logs[-10:])
    message = str(run.error)
    assert message.startswith(
        "the learner died (learner worker 1 of 2 died (ActorDiedError)); resume with "
        "`tame train --resume`: the newest complete checkpoint is "
    ), message
    newest = Path(message.rsplit(" ", 1)[1])
    assert newest.parent == first.parent.parent and (newest / "trainer_state.pt").is_file()
    assert not psutil.wait_procs([p for w in workers if (p := process(w["pid"]))], timeout=30)[1]


def test_two_workers_fed_the_actors_reference_logprobs_train_as_one_computing_them(tiny_assets, tmp_path, ray_local):
    """`rollout.reference_logprobs` on a sharded learner: every worker takes the batch's
    reference log-probs as sent (not summed over the workers like the rows each computes) and
    none holds a reference model; one update matches a lone learner's own reference pass."""
    import copy

    import ray

    from actors.reference import Reference

    overrides = ["learner.num_cpus=1", "ppo.minibatch_size=8", "ppo.micro_batch_size=2", "ppo.kl.coef=0.5"]
    one_cfg = make_cfg(tiny_assets, *overrides, f"run.output_dir={tmp_path}", "run.name=one")
    two_cfg = make_cfg(
        tiny_assets,
        *overrides,
        f"run.output_dir={tmp_path}",
        "run.name=two",
        "learner.num_workers=2",
        "rollout.reference_logprobs=true",
    )
    one = Learner(one_cfg, str(one_cfg.run_dir))
    rollouts = sample(one, prompts(tiny_assets, 16, start=64), seed=50)
    annotated = copy.deepcopy(rollouts)
    Reference(two_cfg, one.pad_id).annotate(annotated)

    two, group = start_learner(two_cfg)
    try:
        assert ray.get(
            two.__ray_call__.remote(
                lambda self: [
                    self.reference is None,
                    *ray.get([w.__ray_call__.remote(lambda worker: worker.reference is None) for w in self.workers]),
                ]
            )
        ) == [True, True]
        pending = two.update.remote(annotated)
        ours, theirs = one.update(rollouts).metrics, ray.get(pending).metrics
        for key in ("objective/kl", "objective/rlhf_reward", "loss/policy_avg", "loss/value_avg", "val/ratio"):
            assert math.isclose(ours[key], theirs[key], rel_tol=1e-4, abs_tol=1e-6), key
        assert max_gap(weights(one.publish()), weights(ray.get(two.publish.remote()))) < ADAM_GAP
    finally:
        stop(two, group)
