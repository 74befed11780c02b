"""Shared fixtures: the tiny offline assets and one local Ray for the whole session.

Building a vLLM engine or starting Ray costs seconds on 2 cores, so both are made once and
shared; tests that need their own cluster (job submission, multi-node) start it themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption(
        "--reverse",
        action="store_true",
        help="run the collected tests in reverse order: no test may rely on one before it",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Tokenizer, policy, reward model and demo data of size tiny, built once per session."""
    from cluster.demo.assets import ensure_assets

    return ensure_assets(tmp_path_factory.mktemp("assets") / "tiny", "tiny", seed=0, log=lambda *_: None)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A local Ray with more logical CPUs than cores, so every role can be placed at once."""
    import ray

    # The switches of tests.faults:gold_unless_poisoned and held_gold, seen by every process
    # of the cluster.
    switches = tmp_path_factory.mktemp("faults")
    os.environ["TAME_TEST_POISON"] = str(switches / "poison")
    os.environ["TAME_TEST_HOLD"] = str(switches / "hold")
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            runtime_env={
                "env_vars": {
                    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                    "VLLM_CPU_KVCACHE_SPACE": "1",
                    "TOKENIZERS_PARALLELISM": "false",
                    "TAME_TEST_POISON": os.environ["TAME_TEST_POISON"],
                    "TAME_TEST_HOLD": os.environ["TAME_TEST_HOLD"],
                }
            },
        )
    yield ray
    ray.shutdown()
