"""The memory plan (`tame plan`, `cluster/plan.py`, `learner/memory.py`): its arithmetic on a 7B
model from config.json alone, the GPU configs' headers, `tame train` refusing a layout that
does not fit before anything starts, and a sharded learner that never holds a whole model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from cluster.plan import check
from cluster.shared.config_file import load_config
from cluster.shared.errors import UserError
from learner.memory import GIB, learner_worker, shape
from tests.support import local_weight_bytes, peak_rss_of_a_learner_process, worker_peaks

REPO = Path(__file__).resolve().parents[1]
QWEN_7B = [
    f"model.policy={REPO / 'configs/models/qwen2.5-7b'}",
    f"model.reward={REPO / 'configs/models/qwen2.5-7b-reward'}",
]


def test_the_plan_counts_a_7b_model_from_its_config_json_alone():
    cfg = load_config(REPO / "configs/gpu-2node.yaml", QWEN_7B)
    policy, critic = shape(cfg, "policy", cfg.model.policy), shape(cfg, "critic", cfg.model.reward)
    # Qwen2.5-7B: 28 layers of 233M parameters, embeddings and an untied head of 152064 x 3584.
    embeddings = 152064 * 3584
    layer = (3584 * 3584 + 3584) + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
    assert policy.parameters == 2 * embeddings + 28 * layer + 3584 == 7_615_616_512
    assert critic.parameters == policy.parameters - embeddings + 3584  # a score head for the LM head
    assert policy.largest_unit == embeddings and policy.kv_width == 512 and policy.checkpoint_bytes == 0
    worker = learner_worker(cfg)
    lines = {line.what.split(" (")[0].split(",")[0]: line.nbytes for line in worker.held + worker.trained}
    assert lines["policy weights"] == 4 * policy.parameters // 8
    assert lines["policy AdamW moments"] == 8 * policy.parameters // 8
    # The reference's linear layers in bfloat16; its embeddings and 57 norms in float32.
    kept = embeddings + 57 * 3584
    assert lines["reference weights"] == (2 * (policy.parameters - kept) + 4 * kept) // 8
    # Host memory: the snapshot; the object store's copy of the policy and its staging, in bfloat16.
    assert [line.nbytes for line in worker.host] == [
        12 * (policy.parameters + critic.parameters) // 8,
        2 * policy.parameters,
        2 * policy.parameters,
    ]


@pytest.mark.parametrize("name", ["gpu.yaml", "gpu-2node.yaml"])
def test_each_gpu_config_fits_80_gb_and_its_header_is_the_plan(name):
    path = REPO / "configs" / name
    started = time.monotonic()
    run = check(load_config(path, QWEN_7B))
    assert time.monotonic() - started < 30  # config.json only: no weights anywhere
    assert run.learner.fits() and all(role.fits() for role in run.roles)
    assert run.learner.budget.nbytes == 80 * GIB and run.learner.update_bytes < 0.75 * 80 * GIB
    header = "\n".join(f"#   {line}" if line.strip() else "#" for line in run.render().splitlines())
    assert header in path.read_text(), (
        f"{path}'s header is not what `tame plan` prints now: paste this in its place:\n{header}"
    )


def test_train_refuses_a_layout_that_does_not_fit_naming_the_fields_and_one_that_does(capsys):
    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs/gpu.yaml"),
            *[a for s in QWEN_7B for a in ("--set", s)],
            "--set",
            "learner.num_workers=3",
            "--set",
            "run.output_dir=/nonexistent/never-written",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "a learner worker needs" in err and "learner.num_workers 3" in err and "cluster.gpu_memory_gib" in err
    assert "Would fit: learner.num_workers 4" in err and "ppo.advantage grpo" in err
    assert not Path("/nonexistent/never-written").exists()


def test_a_role_over_its_share_or_the_machine_is_named(tiny_assets):
    cfg = load_config(REPO / "configs/gpu.yaml", [*QWEN_7B, "rollout.gpu_memory_utilization=0.2"])
    with pytest.raises(UserError, match="KV cache holds 0 tokens, fewer than rollout.max_model_len 2048"):
        check(cfg)
    tiny = load_config(
        REPO / "configs/smoke.yaml",
        [
            f"model.policy={tiny_assets.policy}",
            "rollout.num_actors=30",
            f"model.reward={tiny_assets.reward}",
            "rollout.kv_cache_gib=1",
        ],
    )
    with pytest.raises(UserError, match="the run's processes together need .* GiB, this machine has 24.0 GiB"):
        check(tiny, host_bytes=24 * GIB)


def test_tame_plan_prints_every_role(tiny_assets, capsys):
    assert (
        main(
            [
                "plan",
                "--config",
                str(REPO / "configs/smoke.yaml"),
                "--set",
                f"model.policy={tiny_assets.policy}",
                "--set",
                f"model.reward={tiny_assets.reward}",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "learner worker (1 of 1, cpu" in out and "rollout actor (x1, cpu" in out and "= update peak" in out


# --------------------------------------------------------------------------- measured


def test_a_sharded_learner_never_holds_a_whole_model(tmp_path, ray_local):
    """Two workers of a learner whose three models (policy, reference, critic) are 0.6 GB in
    float32, from a bfloat16 checkpoint: each worker's peak resident memory while it starts
    is its shards and its share of the file being read, never a whole model, and the plan's
    figure."""
    import ray
    from ray.util.placement_group import remove_placement_group
    from transformers import LlamaConfig, LlamaForCausalLM

    from cluster.demo.assets import build_tokenizer, save_tokenizer
    from cluster.launch import start_learner

    folder = tmp_path / "policy"
    tokenizer = build_tokenizer(1024, seed=0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32000,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).to(torch.bfloat16).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    cfg = load_config(
        None,
        [
            f"model.policy={folder}",
            "model.reward=null",
            "learner.critic=policy",
            "reward.functions=[{function: 'tests.faults:gold_unless_poisoned', weight: 1.0}]",
            "learner.num_workers=2",
            "learner.num_cpus=1",
            f"run.output_dir={tmp_path}",
        ],
    )
    whole = sum(4 * shape(cfg, role, folder).parameters for role in ("policy", "reference", "critic"))
    assert whole > 0.6e9

    baseline = ray.get(ray.remote(num_cpus=0)(peak_rss_of_a_learner_process).remote())
    learner, group = start_learner(cfg)
    try:
        peaks, local = worker_peaks(learner), local_weight_bytes(learner)
    finally:
        ray.kill(learner)
        remove_placement_group(group)
    assert local == pytest.approx(whole / 2, rel=0.01)  # each worker's shards: half of every model
    planned = learner_worker(cfg).startup_bytes
    for peak in peaks:
        assert peak - baseline < 0.75 * whole, (peak, baseline, whole)  # half of each model, a slice of a file
        assert peak == pytest.approx(planned, rel=0.15), (peak, planned)
