"""LoRA (`learner.lora`): the learner trains an adapter on its frozen base, publishes the adapter
alone, and a real vLLM engine serves each version as an adapter it proves it holds; checkpoints
are peft folders that resume, and `tame export` merges one into a model vLLM loads."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from cluster.shared.config_file import load_config
from cluster.shared.errors import ConfigError
from cluster.shared.lora import adapter_layout, adapter_tensors
from cluster.shared.records import Prompt
from cluster.shared.transport import WeightsHandle, export_tensors, probes_of
from learner.learner import Learner
from tests.test_learner import make_cfg, prompts, sample

pytestmark = pytest.mark.usefixtures("ray_local")

LORA = ("learner.lora.rank=4", "learner.lora.alpha=8", "ppo.learning_rate=0.01")
ENGINE = ("rollout.max_model_len=128", "rollout.kv_cache_gib=0.25", "rollout.sampling.max_new_tokens=12")


def lora_cfg(assets, *overrides: str):
    return make_cfg(assets, *LORA, *ENGINE, *overrides)


def trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_fused_adapter_forward_computes_what_peft_computes(tiny_assets):
    """`learner.lora`'s one-addmm forward against peft's own, forward and backward, with B not
    zero (a trained adapter); and with the adapter switched off, the base alone."""
    from transformers import AutoModelForCausalLM

    from learner import lora

    cfg = lora_cfg(tiny_assets)
    model = lora.wrap(cfg, AutoModelForCausalLM.from_pretrained(tiny_assets.policy, dtype=torch.float32))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    ids = torch.randint(0, 100, (3, 9), generator=generator)
    layers = [m for m in model.modules() if "forward" in vars(m)]
    assert layers, "no LoRA layer got the fused forward"

    def run():
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        grads = trained_grads(model)
        model.zero_grad(set_to_none=True)
        return logits.detach(), grads

    fused_logits, fused_grads = run()
    with torch.no_grad(), model.disable_adapter():
        off = model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_assets.policy, dtype=torch.float32).eval()
    torch.testing.assert_close(off, base(input_ids=ids).logits.detach())
    for layer in layers:
        layer.forward = type(layer).forward.__get__(layer)  # peft's own
    peft_logits, peft_grads = run()
    torch.testing.assert_close(fused_logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == peft_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(off, peft_logits)


def trained_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_learner_trains_the_adapter_alone_and_its_base_is_the_reference(tiny_assets, tmp_path):
    cfg = lora_cfg(tiny_assets)
    learner = Learner(cfg, str(tmp_path / "lora"))
    full = Learner(make_cfg(tiny_assets), str(tmp_path / "full"))
    layout = adapter_layout(cfg)
    adapter = sum(math.prod(shape) for shape in layout.values())
    assert learner.reference is None  # no second copy of the model
    frozen = {n: p.detach().clone() for n, p in learner.policy.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(list(full.policy.parameters()))
    # Only the adapter is optimised, and it is float32.
    (optimised,) = [g["params"] for g in learner.optimizers["policy"].param_groups]
    assert sum(p.numel() for p in optimised) == adapter
    assert all(p.dtype == torch.float32 for p in optimised)

    batch = sample(learner, prompts(tiny_assets, 8), seed=1)
    ref, old, _ = learner._no_grad_passes(learner.tokens(batch))
    full_ref, _, _ = full._no_grad_passes(full.tokens(batch))
    # The adapter off is the reference model; and at version 0 (B = 0) the policy is it too.
    torch.testing.assert_close(ref, full_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(old, ref, rtol=0, atol=1e-6)

    before = trained(learner.policy)
    results = [learner.update(sample(learner, prompts(tiny_assets, 8, start=8 * i), seed=i)) for i in range(3)]
    critic = sum(p.numel() for p in learner.critic.parameters())  # GAE's critic stays a full model
    assert results[0].metrics["learner/trained_parameters"] == adapter + critic
    assert results[0].metrics["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert abs(results[-1].metrics["objective/kl"]) > 1e-3  # and then moves away from it
    after = trained(learner.policy)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    for name, param in learner.policy.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name

    # A version is the adapter alone, named and shaped as the actors expect it.
    handle = results[-1].weights
    assert {s.name: s.shape for s in handle.specs} == layout
    assert handle.nbytes == 4 * adapter
    assert all(s.name.startswith("base_model.model.model.layers.") for s in handle.specs)
    # ... and exactly peft's own state dict of the adapter, the tensors themselves.
    from peft import get_peft_model_state_dict

    peft_own = get_peft_model_state_dict(learner.policy, adapter_name="default")
    ours = dict(adapter_tensors(learner.policy))
    assert ours.keys() == peft_own.keys()
    assert all(ours[n].data_ptr() == peft_own[n].data_ptr() for n in ours)


def test_a_lora_run_resumes_exactly_and_its_checkpoint_is_a_peft_adapter(tiny_assets, tmp_path):
    from peft import PeftModel
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    cfg = lora_cfg(tiny_assets, "ppo.epochs=2", "ppo.lr_schedule=linear")
    sampler = Learner(cfg, str(tmp_path / "sampler"))
    batches = [sample(sampler, prompts(tiny_assets, 8, start=8 * i), seed=10 + i) for i in range(3)]
    straight = Learner(cfg, str(tmp_path / "straight"))
    for batch in batches:
        straight.update(batch)
    first = Learner(cfg, str(tmp_path / "resumed"))
    first.update(batches[0])
    path = Path(first.save_checkpoint({"cursor": 1}))
    del first

    # The shards hold the adapter and its optimizer states, not the frozen base.
    saved = FileSystemReader(path / "sharded").read_metadata().state_dict_metadata
    assert saved and all("lora_" in key for key in saved if key.startswith("policy."))
    resumed = Learner(cfg, str(tmp_path / "resumed"))
    assert resumed.load_checkpoint() == {"cursor": 1}
    for batch in batches[1:]:
        resumed.update(batch)
    a, b = trained(straight.policy), trained(resumed.policy)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

    # policy/ is a peft adapter folder: on its base it computes what the learner computed.
    config = json.loads((path / "policy" / "adapter_config.json").read_text())
    assert config["r"] == 4 and Path(config["base_model_name_or_path"]) == Path(tiny_assets.policy).resolve()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets.policy), path / "policy")
    resumed_at_1 = Learner(cfg, str(tmp_path / "resumed"))
    resumed_at_1.load_checkpoint(str(path))
    ids = torch.tensor([batches[0][0].prompt_token_ids + batches[0][0].response_token_ids])
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, resumed_at_1.policy(ids).logits, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def served(tiny_assets, tmp_path_factory):
    """A LoRA learner and an in-process rollout actor of the same config (max_staleness 1:
    the engine keeps 3 adapters)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from actors.rollout import RolloutActor

    cfg = lora_cfg(tiny_assets, "train.max_staleness=1", "rollout.sampling.temperature=0.8")
    learner = Learner(cfg, str(tmp_path_factory.mktemp("lora-served")))
    actor = RolloutActor(cfg, 0)
    yield learner, actor


def engine_adapters(actor) -> set[int]:
    (ids,) = actor._llm.collective_rpc(lambda worker: sorted(worker.model_runner.lora_manager.list_adapters()))
    return set(ids)


def engine_kernels(worker) -> tuple[list[str], int | None]:
    """The engine's LoRA layers, and the slot its wrapper last found every token under."""
    from actors.lora_kernels import SingleAdapterPunicaCPU

    manager = worker.model_runner.lora_manager._adapter_manager
    (wrapper,) = manager.punica_wrapper_mapping.values()
    assert isinstance(wrapper, SingleAdapterPunicaCPU)
    return sorted(manager.modules), wrapper.slot


def test_an_engine_serves_each_version_as_a_proven_adapter_with_the_learners_log_probs(tiny_assets, served):
    learner, actor = served
    texts = prompts(tiny_assets, 4, start=40)
    result = actor.load_weights(learner.publish())  # version 0: an adapter whose B is 0
    assert result.loaded and result.verified and result.probe_rms_error < 1e-6, result
    for i in range(4):
        update = learner.update(sample(learner, prompts(tiny_assets, 8, start=8 * i), seed=20 + i))
        result = actor.load_weights(update.weights)
        assert result.loaded and result.verified and result.policy_version == learner.version(), result
        assert result.bytes == update.weights.nbytes < 100_000  # the adapter, not the 0.3M-parameter model
    # Old adapters are dropped: the newest max_staleness + 2 stay (ids are version + 1).
    assert engine_adapters(actor) == {learner.version() + 1 - k for k in range(3)}

    batch = actor.generate([Prompt(f"p{i}", (("user", t),)) for i, t in enumerate(texts)])
    assert batch.policy_version == learner.version() == 4
    # It ran on the dense single-adapter path (actors/lora_kernels.py), in the adapter's layers alone.
    (wrapped, slot) = actor._llm.collective_rpc(engine_kernels)[0]
    assert slot is not None and slot >= 0
    assert wrapped and not any("embed" in name or "lm_head" in name for name in wrapped)
    learned = learner.logprobs(batch.rollouts)
    gap = max(abs(a - b) for r, row in zip(batch.rollouts, learned) for a, b in zip(r.behaviour_logprobs, row))
    assert gap < 1e-4, gap
    with torch.no_grad(), learner.policy.disable_adapter():  # and the adapter is what moved them
        base = learner.logprobs(batch.rollouts)
    assert max(abs(a - b) for x, y in zip(learned, base) for a, b in zip(x, y)) > 1e-2


@pytest.mark.parametrize("lora_ids", [(2,) * 7, (0,) * 7, (2, 2, 0, 0, 3, 3, 3)], ids=["one", "none", "mixed"])
def test_the_single_adapter_kernels_compute_what_vllms_compute(lora_ids):
    """A fused qkv layer's LoRA (three slices, rank 8, scale 2) on 7 tokens, through tame's
    wrapper and through vLLM's, for a step under one adapter, under none, and mixed."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from actors.lora_kernels import SingleAdapterPunicaCPU

    g = torch.Generator().manual_seed(0)
    slots, rank, width, slices = 3, 8, 32, (32, 16, 16)
    a = tuple(torch.randn(slots, 1, rank, width, generator=g) for _ in slices)  # (slot, 1, rank, in)
    b = tuple(torch.randn(slots, 1, out, rank, generator=g) for out in slices)  # (slot, 1, out, rank)
    x = torch.randn(len(lora_ids), width, generator=g)
    base = torch.randn(len(lora_ids), sum(slices), generator=g)
    mapping = LoRAMapping(lora_ids, lora_ids, is_prefill=True)  # every token samples
    outputs = {}
    for wrapper_cls in (PunicaWrapperCPU, SingleAdapterPunicaCPU):
        wrapper = wrapper_cls(64, 8, "cpu")
        wrapper.update_metadata(mapping, [1, 2, 3], slots + 1, 100)  # lora id 2 is in slot 1
        y = base.clone()
        wrapper.add_lora_linear(y, x, a, b, 2.0, slices)
        outputs[wrapper_cls] = y
    # The slot the whole step runs under: slot 1, none (-1), or none shared (vLLM's kernels ran).
    assert wrapper.slot == {(2,): 1, (0,): -1}.get(tuple(set(lora_ids)))
    fast = outputs[SingleAdapterPunicaCPU]
    torch.testing.assert_close(fast, outputs[PunicaWrapperCPU], rtol=1e-6, atol=1e-5)  # summed in another order
    if set(lora_ids) == {2}:  # by hand: base + 2 * x @ A.T @ B.T of slot 1, slice by slice
        expected = torch.cat([2.0 * x @ a_[1, 0].T @ b_[1, 0].T for a_, b_ in zip(a, b)], dim=1)
        torch.testing.assert_close(fast, base + expected, rtol=1e-6, atol=1e-5)
    if set(lora_ids) == {0}:
        assert torch.equal(fast, base)


def test_a_corrupted_adapter_is_refused_and_a_load_that_did_not_happen_is_caught(served, monkeypatch):
    import ray

    import actors.rollout

    learner, actor = served
    clean = {n: t.detach().clone() for n, t in adapter_tensors(learner.policy)}
    probes = ray.put(probes_of(clean.items()))
    version = actor.policy_version()
    for name in [n for n in clean if ".layers.0." in n]:  # A and B of every module of a layer
        bad = dict(clean)
        bad[name] = clean[name] + 1e-3  # B is still 0 if no update ran before
        arrays, specs = export_tensors(bad.items())
        version += 1
        result = actor.load_weights(WeightsHandle(version, (ray.put(tuple(arrays)),), specs, probes, 0))
        assert result.loaded is True and result.verified is False, name
        assert f"engine tensor {name!r} differs" in result.problem, (name, result.problem)

    # verl's bug: the adapter never reaches the engine. The engine's slots say so.
    monkeypatch.setattr(actors.rollout, "load_adapter", lambda *args: None)
    arrays, specs = export_tensors(clean.items())
    result = actor.load_weights(WeightsHandle(version + 1, (ray.put(tuple(arrays)),), specs, probes, 0))
    assert result.loaded is True and result.verified is False
    assert "is not in the engine" in result.problem, result.problem


def test_the_merged_export_loads_in_vllm_and_samples_the_adapters_log_probs(tiny_assets, served, tmp_path):
    from vllm import LLM

    from tests.test_learner import vllm_rollouts

    learner, _ = served
    checkpoint = learner.save_checkpoint({})
    assert main(["export", checkpoint, "--out", str(tmp_path / "merged")]) == 0
    llm = LLM(
        model=str(tmp_path / "merged"),
        dtype="float32",
        max_model_len=128,
        seed=0,
        enforce_eager=True,
        kv_cache_memory_bytes=2**27,
        logprobs_mode="processed_logprobs",
    )
    rollouts = vllm_rollouts(llm, learner.tokenizer, prompts(tiny_assets, 4), 0.8, 12)
    learned = learner.logprobs(rollouts)
    gap = max(abs(a - b) for r, row in zip(rollouts, learned) for a, b in zip(r.behaviour_logprobs, row))
    assert gap < 1e-4, gap
    # Nothing half-written: a folder that is no checkpoint is refused with exit 2.
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "nothing")]) == 2
    assert not (tmp_path / "nothing").exists()


def test_lora_configs_that_cannot_work_are_refused_naming_the_field(tiny_assets):
    with pytest.raises(ConfigError, match="learner.lora.rank"):
        lora_cfg(tiny_assets, "learner.lora.rank=0")
    with pytest.raises(ConfigError, match="learner.num_workers 1"):
        lora_cfg(tiny_assets, "learner.num_workers=2")
    with pytest.raises(ConfigError, match="not a power of two"):
        lora_cfg(tiny_assets, "model.dtype=bfloat16", "learner.lora.alpha=12")
    cfg = lora_cfg(tiny_assets, "learner.lora.target_modules=[q_proj,qkv_proj]")
    with pytest.raises(ConfigError, match=r"qkv_proj is not a linear layer .* \(its linear layers: down_proj"):
        adapter_layout(cfg)
    cfg = lora_cfg(tiny_assets, "learner.lora.target_modules=[lm_head]")
    with pytest.raises(ConfigError, match="lm_head is not a linear layer of the decoder"):
        adapter_layout(cfg)


def test_the_plan_counts_a_lora_learner_as_it_is():
    """Qwen2.5-7B (config.json only) with a rank-16 adapter on every linear layer of its 28
    decoder layers, on one 80 GB GPU: the base in bfloat16 and no reference of its own; the
    adapter, its gradients and moments in float32; the adapter's arithmetic by hand."""
    from learner.memory import learner_worker, shape
    from tests.conftest import REPO

    overrides = [
        f"model.policy={REPO}/configs/models/qwen2.5-7b",
        f"model.reward={REPO}/configs/models/qwen2.5-7b-reward",
        "learner.num_workers=1",
        "learner.param_dtype=null",
        "learner.reduce_dtype=null",
        "learner.compute_dtype=bfloat16",
        "ppo.advantage=grpo",
        "rollout.sampling.samples_per_prompt=4",
    ]
    full = learner_worker(load_config(REPO / "configs/gpu.yaml", overrides))
    lora = learner_worker(load_config(REPO / "configs/gpu.yaml", [*overrides, "learner.lora.rank=16"]))
    hidden, kv, intermediate = 3584, 512, 18944  # q/o: hidden -> hidden, k/v: -> kv, the MLP: <-> intermediate
    adapter = 28 * 16 * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + intermediate))
    assert adapter == 40_370_176
    lines = {line.what: line.nbytes for line in lora.held + lora.trained}
    base = shape(load_config(None, overrides[:2]), "policy", overrides[0].split("=", 1)[1]).parameters
    assert lines["policy base, frozen, bfloat16, the reference too (7.62B parameters)"] == 2 * base
    assert lines["policy LoRA adapter, float32 (40.37M parameters)"] == 4 * adapter
    assert lines["policy AdamW moments, float32"] == 8 * adapter
    assert not any(what.startswith("reference") for what in lines)
    grads = [line for phase in lora.phases.values() for line in phase if line.what == "policy gradients, float32"]
    assert grads and all(line.nbytes == 4 * adapter for line in grads)
    assert lora.fits() and lora.update_bytes < 0.3 * full.update_bytes
