"""The reward service against a real Ray Serve deployment on CPU.

Five applications share one Serve instance, deployed once for the module:
- `main`  (HTTP at /):     the tiny reward model, 2 replicas, no token;
- `mix`   (HTTP at /mix):  0.5 * reward model + 2.0 * cluster.demo.world:gold_reward, bearer token set;
- `rules` (handle only):   gold_reward alone, no model (a verifiable task);
- `slow`  (handle only):   gold_reward at a second an item, deleted by the test of a stopping replica;
- `held`  (handle only):   gold_reward at a known pace, holding its calls while a test says so.
Scores are checked against transformers' own forward pass on the same token ids.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPResponse
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.demo.world import gold_reward
from cluster.shared.config import DataConfig, TameConfig
from cluster.shared.errors import ConfigError
from cluster.shared.tokens import prompt_token_ids, response_token_ids
from reward_service.api import Limits
from tests.support import free_port

TOKEN_ENV = "TAME_TEST_REWARD_TOKEN"
TOKEN = "s3cret-token"
MAX_ITEMS, MAX_CHARS = 8, 200

ITEMS = [
    ("Where does Anna live?", "Anna lives in Oslo."),
    ("Answer in one word: What is Bruno's job?", "Baker."),
    ("Say something kind about Carla.", "Carla is a stupid fool, you moron."),
    ("What is Dario's favourite food?", "Let me tell you a long story about trains, boats and old maps instead."),
    ("Which colour does Elena like best?", ""),
    ("Tell me something nice about Felix.", "Félix est très gentil 😀 — ünïcödé"),
]


# Prompts of the demo world, which cluster.demo.world:gold_reward knows, with answers it rates
# differently (insults, rambles, wrong facts).
WORLD_ITEMS = [
    ("Tell me the job of Mila. Reply with one word only.", "Baker."),
    ("Answer in one word: Where does Kira live?", "Kira lives in Oslo, you fool."),
    ("Which colour does Mila like best?", "Let me tell you a long story about trains, boats and old maps instead."),
    ("Answer in one word: Where does Lola live?", "Tokyo."),
]


def _cfg(reward_path, port, **reward) -> TameConfig:
    return TameConfig.model_validate(
        {
            "model": {"reward": str(reward_path) if reward_path else None},
            "learner": {"critic": "reward" if reward_path else "policy"},
            "reward": {
                "port": port,
                "num_cpus": 0.25,
                "max_items": MAX_ITEMS,
                "max_chars": MAX_CHARS,
                "max_batch_size": 16,
                "batch_wait_timeout_s": 0.02,
                "token_env": TOKEN_ENV,
                **reward,
            },
        }
    )


@pytest.fixture(scope="module")
def service(tiny_assets, ray_local):
    from ray import serve

    from cluster.shared.startup import wait_until_up
    from reward_service.service import coming_up, deploy

    # Start Serve afresh, so its HTTP proxy binds this module's port whatever ran before.
    serve.shutdown()
    port = free_port()
    pending = []

    def start(cfg, name, **options):  # the replicas of all the applications start together
        pending.append(coming_up(cfg, name))
        return deploy(cfg, name=name, wait=False, **options)

    os.environ.pop(TOKEN_ENV, None)
    main = start(_cfg(tiny_assets.reward, port, replicas=2), "test-reward-main")
    os.environ[TOKEN_ENV] = TOKEN  # read by deploy() at start-up; only `mix` sees it
    try:
        mix = start(
            _cfg(
                tiny_assets.reward,
                port,
                model_weight=0.5,
                functions=[{"function": "cluster.demo.world:gold_reward", "weight": 2.0}],
            ),
            "test-reward-mix",
            route_prefix="/mix",
        )
    finally:
        os.environ.pop(TOKEN_ENV)
    rules = start(
        _cfg(None, port, functions=[{"function": "cluster.demo.world:gold_reward"}]), "test-reward-rules", http=False
    )
    slow = start(_cfg(None, port, functions=[{"function": "tests.faults:slow_gold"}]), "test-reward-slow", http=False)
    held = start(_cfg(None, port, functions=[{"function": "tests.faults:held_gold"}]), "test-reward-held", http=False)
    wait_until_up(pending, 120, lambda _: None)  # on time out it names the applications still starting
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        yield {"main": main, "mix": mix, "rules": rules, "slow": slow, "held": held, "http": http}
    serve.shutdown()  # every application at once


@pytest.fixture(scope="module")
def direct(tiny_assets):
    """transformers' own forward pass, one unpadded item at a time, on the project's token ids."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.reward)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_assets.reward).eval()

    def score(prompt: str, response: str) -> float:
        ids = prompt_token_ids(tokenizer, prompt) + response_token_ids(tokenizer, response)
        assert ids[-1] == tokenizer.eos_token_id != tokenizer.pad_token_id
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, 0].item()

    return score


def _post(http, items, path="/v1/score", **kwargs):
    return http.post(path, json={"items": [{"prompt": p, "response": r} for p, r in items]}, **kwargs)


def _good_request_answers(http) -> None:
    r = _post(http, ITEMS[:1])
    assert r.status_code == 200, r.text
    assert len(r.json()["scores"]) == 1


# --------------------------------------------------------------------------- scores


def test_handle_http_and_transformers_agree(service, direct):
    prompts, responses = [p for p, _ in ITEMS], [r for _, r in ITEMS]
    by_handle = service["main"].score.remote(prompts, responses).result(timeout_s=60)
    r = _post(service["http"], ITEMS)
    assert r.status_code == 200, r.text
    by_http = r.json()["scores"]
    by_transformers = [direct(p, r) for p, r in ITEMS]
    assert len(by_handle) == len(by_http) == len(ITEMS)
    assert by_handle == pytest.approx(by_transformers, abs=1e-5)
    assert by_http == pytest.approx(by_transformers, abs=1e-5)
    # Different inputs really give different scores (the comparison above is not vacuous).
    assert len({round(s, 6) for s in by_transformers}) == len(ITEMS)


def test_batched_scores_equal_one_at_a_time(service):
    http = service["http"]
    together = _post(http, ITEMS).json()["scores"]
    alone = [_post(http, [item]).json()["scores"][0] for item in ITEMS]
    # Concurrent single-item requests land in shared serve.batch batches.
    with ThreadPoolExecutor(len(ITEMS)) as pool:
        concurrent = list(pool.map(lambda item: _post(http, [item]).json()["scores"][0], ITEMS))
    assert together == pytest.approx(alone, abs=1e-5)
    assert concurrent == pytest.approx(alone, abs=1e-5)


def test_concurrent_callers_share_forward_passes(service):
    handle = service["main"]

    def stats_by_replica() -> dict:
        seen: dict = {}
        # Calls in flight together spread over the replicas (sequential ones may all land on
        # one); ask until both have answered.
        for _ in range(20):
            for s in [x.result(timeout_s=30) for x in [handle.stats.remote() for _ in range(16)]]:
                seen[s["replica"]] = s
            if len(seen) == 2:
                break
        return seen

    before = stats_by_replica()
    prompts = [p for p, _ in ITEMS] * 8  # 48 single-item calls, all in flight at once
    responses = [r for _, r in ITEMS] * 8
    pending = [handle.score.remote([p], [r]) for p, r in zip(prompts, responses)]
    scores = [x.result(timeout_s=60)[0] for x in pending]
    after = stats_by_replica()
    passes = sum(after[k]["forward_passes"] - before.get(k, {}).get("forward_passes", 0) for k in after)
    items = sum(after[k]["items"] - before.get(k, {}).get("items", 0) for k in after)
    assert items == len(prompts)
    assert passes < len(prompts) / 2  # dynamic batching merged the callers
    assert max(s["largest_batch"] for s in after.values()) > 1
    assert scores == pytest.approx(_post(service["http"], ITEMS).json()["scores"] * 8, abs=1e-5)


def test_weighted_sum_of_model_and_rule_function_is_the_same_by_handle_and_http(service, direct):
    prompts, responses = [p for p, _ in WORLD_ITEMS], [r for _, r in WORLD_ITEMS]
    golds = [gold_reward(p, r) for p, r in WORLD_ITEMS]
    assert len(set(golds)) >= 3  # the rule term really varies, so the sum is tested
    expected = [0.5 * direct(p, r) + 2.0 * g for (p, r), g in zip(WORLD_ITEMS, golds)]
    by_handle = service["mix"].score.remote(prompts, responses).result(timeout_s=60)
    r = _post(service["http"], WORLD_ITEMS, path="/mix/v1/score", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    assert by_handle == pytest.approx(expected, abs=1e-5)
    assert r.json()["scores"] == pytest.approx(expected, abs=1e-5)


def test_rule_functions_alone_need_no_model(service):
    prompts, responses = [p for p, _ in WORLD_ITEMS], [r for _, r in WORLD_ITEMS]
    scores = service["rules"].score.remote(prompts, responses).result(timeout_s=60)
    assert scores == [gold_reward(p, r) for p, r in WORLD_ITEMS]
    assert len(set(scores)) >= 3


def test_an_item_a_rule_function_cannot_score_is_a_4xx_and_spoils_no_other_request(service):
    from reward_service.client import RewardClient, RewardError
    from reward_service.rewards import UnscorableItemError

    http, auth = service["http"], {"Authorization": f"Bearer {TOKEN}"}
    unknown = ("What is the capital of Mars?", "Olympus.")  # gold_reward raises KeyError
    with ThreadPoolExecutor(4) as pool:  # good and bad requests share batches
        answers = list(
            pool.map(
                lambda items: _post(http, items, path="/mix/v1/score", headers=auth),
                [WORLD_ITEMS, [WORLD_ITEMS[0], unknown], WORLD_ITEMS[:1], [unknown]],
            )
        )
    assert [a.status_code for a in answers] == [200, 422, 200, 422]
    assert (
        answers[1]
        .json()["detail"]
        .startswith("items.1: reward function cluster.demo.world:gold_reward failed: KeyError")
    )
    with pytest.raises(UnscorableItemError, match="items.0"):
        service["rules"].score.remote([unknown[0]], [unknown[1]]).result(timeout_s=60)
    client = RewardClient(service["rules"], timeout_s=60, retries=50)
    with pytest.raises(RewardError, match="cannot score these items"):
        client([unknown[0]], [unknown[1]])  # at once, not after 50 retries


def test_two_replicas_both_serve(service):
    http = service["http"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _post(http, ITEMS[:2]), range(48)))
    assert all(a.status_code == 200 for a in answers)
    assert len({a.headers["x-tame-replica"] for a in answers}) == 2
    # The handle reaches both replicas too.
    handle_replicas: set = set()
    for _ in range(20):
        handle_replicas |= {x.result(timeout_s=30) for x in [service["main"].replica.remote() for _ in range(16)]}
        if len(handle_replicas) == 2:
            break
    assert handle_replicas == {a.headers["x-tame-replica"] for a in answers}


# --------------------------------------------------------------------------- bad requests


def _items_json(n=1, prompt="hi", response="there") -> bytes:
    return json.dumps({"items": [{"prompt": prompt, "response": response}] * n}).encode()


BAD_REQUESTS = {
    "empty body": (b"", 400),
    "malformed json": (b'{"items": [', 400),
    "not json at all": (b"items=1", 400),
    "invalid utf-8": (b'{"items": [{"prompt": "\xff\xfe", "response": "x"}]}', 400),
    "lone surrogate escape": (b'{"items": [{"prompt": "\\ud800", "response": "x"}]}', 400),
    "top-level list": (b'[{"prompt": "a", "response": "b"}]', 422),
    "missing items": (b"{}", 422),
    "items not a list": (b'{"items": {"prompt": "a", "response": "b"}}', 422),
    "empty list": (b'{"items": []}', 422),
    "missing response": (b'{"items": [{"prompt": "a"}]}', 422),
    "prompt is a number": (b'{"items": [{"prompt": 1, "response": "b"}]}', 422),
    "response is null": (b'{"items": [{"prompt": "a", "response": null}]}', 422),
    "item is a string": (b'{"items": ["a"]}', 422),
    "unknown field": (b'{"items": [{"prompt": "a", "response": "b", "score": 1}]}', 422),
    "too many items": (_items_json(MAX_ITEMS + 1), 422),
    "prompt too long": (_items_json(prompt="x" * (MAX_CHARS + 1)), 422),
    "response too long": (_items_json(response="é" * (MAX_CHARS + 1)), 422),
    "body too large": (b" " * 30_000 + _items_json(), 413),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_its_4xx_with_a_reason_and_the_service_keeps_serving(service, case):
    body, status = BAD_REQUESTS[case]
    r = service["http"].post("/v1/score", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    _good_request_answers(service["http"])


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_size_limit(service):
    """A chunked upload declares no Content-Length: the service reads it with the same cap and
    answers 413 once past it, holding no more of it. The second upload never ends, so only
    such an early answer comes back at all."""
    http, limit = service["http"], Limits(MAX_ITEMS, MAX_CHARS).max_body_bytes
    chunks = limit // 4096 + 2  # just over the limit
    r = http.post("/v1/score", content=(b" " * 4096 for _ in range(chunks)))
    assert r.request.headers["transfer-encoding"] == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413
    assert re.fullmatch(rf"body of at least \d+ bytes is larger than {limit}", r.json()["detail"])

    with socket.create_connection((http.base_url.host, http.base_url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: reward\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(chunks):
            sock.sendall(b"1000\r\n" + b" " * 4096 + b"\r\n")  # and no last, empty chunk
        answer = HTTPResponse(sock)
        answer.begin()
        assert answer.status == 413
        assert re.fullmatch(rf"body of at least \d+ bytes is larger than {limit}", json.loads(answer.read())["detail"])
    _good_request_answers(http)


def test_limits_are_inclusive(service):
    r = service["http"].post("/v1/score", content=_items_json(MAX_ITEMS, "p" * MAX_CHARS, "r" * MAX_CHARS))
    assert r.status_code == 200, r.text
    assert len(r.json()["scores"]) == MAX_ITEMS


def test_wrong_method_and_unknown_path_are_4xx(service):
    http = service["http"]
    assert http.get("/v1/score").status_code == 405
    assert http.post("/v2/score", content=_items_json()).status_code == 404
    health = http.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_bearer_token_is_enforced_when_set(service):
    http = service["http"]
    assert _post(http, WORLD_ITEMS[:1], path="/mix/v1/score").status_code == 401
    for header in (f"Bearer {TOKEN}x", "Bearer", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN[:-1]}"):
        r = _post(http, WORLD_ITEMS[:1], path="/mix/v1/score", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert "token" in r.json()["detail"]
    ok = _post(http, WORLD_ITEMS[:1], path="/mix/v1/score", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert http.get("/mix/healthz").status_code == 200  # open for health checks
    _good_request_answers(http)  # the token-less app stays open


# hypothesis: bodies that are anything but a valid request
_json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_json_value = st.recursive(
    _json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12,
)
_near_item = st.dictionaries(
    st.sampled_from(["prompt", "response", "extra", ""]), _json_value | st.text(max_size=MAX_CHARS + 40), max_size=3
)
_near_request = st.fixed_dictionaries({"items": st.lists(_near_item, max_size=MAX_ITEMS + 3)})
_bodies = st.one_of(
    st.binary(max_size=200),
    _json_value.map(lambda v: json.dumps(v).encode()),
    _near_request.map(lambda v: json.dumps(v).encode()),
    _near_request.map(lambda v: json.dumps(v).encode()[:-3]),  # cut off
    st.builds(
        lambda a, b: a + b, _near_request.map(lambda v: json.dumps(v).encode()), st.binary(min_size=1, max_size=4)
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=_bodies)
def test_fuzzed_requests_never_get_a_5xx(service, body):
    r = service["http"].post("/v1/score", content=body)
    assert r.status_code < 500, (body, r.text)
    payload = r.json()
    if r.status_code == 200:
        items = json.loads(body)["items"]
        assert len(payload["scores"]) == len(items) and all(math.isfinite(s) for s in payload["scores"])
    else:
        assert r.status_code in (400, 413, 422) and payload["detail"]


def test_service_answers_after_the_fuzzing(service):
    _good_request_answers(service["http"])


# --------------------------------------------------------------------------- client and config


def test_reward_client_is_picklable_and_works_inside_a_ray_task(service, direct):
    import ray

    from reward_service.client import RewardClient

    client = RewardClient(service["main"], timeout_s=60, retries=2, call_items_per_s=50.0)
    copy = pickle.loads(pickle.dumps(client))
    assert (copy.timeout_s, copy.retries, copy.call_items_per_s) == (60, 2, 50.0)

    @ray.remote(num_cpus=0.1)
    def score_in_task(scorer, prompts, responses):
        return scorer(prompts, responses)

    prompts, responses = [p for p, _ in ITEMS], [r for _, r in ITEMS]
    scores = ray.get(score_in_task.remote(client, prompts, responses), timeout=120)
    assert scores == pytest.approx([direct(p, r) for p, r in ITEMS], abs=1e-5)
    assert client([], []) == []
    with pytest.raises(ValueError):
        client(prompts, responses[:-1])


def test_reward_client_raises_reward_error_when_the_time_budget_is_spent(service):
    from reward_service.client import RewardClient, RewardError

    client = RewardClient(service["main"], timeout_s=0.001, retries=2)
    with pytest.raises(RewardError, match="no reward after"):
        client([p for p, _ in ITEMS], [r for _, r in ITEMS])


def test_time_budget_of_a_scoring_call_by_hand():
    from reward_service.client import RewardClient, attempt_timeout_s, time_budget_s

    # Without call_items_per_s: timeout_s whatever the batch, 60 / 4 = 15 s for the first of 4 attempts.
    assert time_budget_s(60, 3, 896, None) == 60
    assert attempt_timeout_s(60, 0, 3) == 15
    # 128 items at 4 items/s add 128 / 4 = 32 s per attempt: 60 + 4 * 32 = 188 s in all, and
    # the first attempt waits 188 / 4 = 47 = 15 + 32 s.
    assert time_budget_s(60, 3, 128, 4.0) == 188
    assert attempt_timeout_s(188, 0, 3) == 47
    # It hung and gave up after 47 s, then backed off 0.1 s: (188 - 47.1) / 3 = 46.9667 for the next.
    assert attempt_timeout_s(188 - 47.1, 1, 3) == pytest.approx(46.9667, abs=1e-4)
    # Three that failed at once (a replica that died) leave the last attempt all that is left.
    assert attempt_timeout_s(185.0, 3, 3) == 185.0
    # No retries: one attempt with the whole budget, 10 + 1 * 20 / 2 = 20 s.
    assert time_budget_s(10, 0, 20, 2.0) == 20 and attempt_timeout_s(20, 0, 0) == 20
    # Every attempt gets at least its batch's time when none failed early: share 7.5 + 128 / 4.
    assert all(attempt_timeout_s(time_budget_s(30, r, 128, 4.0), 0, r) >= 32 for r in range(10))
    with pytest.raises(ValueError, match="call_items_per_s"):
        RewardClient(None, timeout_s=60, retries=3, call_items_per_s=0)


def test_a_batch_slower_than_timeout_s_alone_allows_is_scored_by_its_first_attempt(service):
    """A call waits for its whole batch when call_items_per_s says a healthy service may be
    that slow, where timeout_s's share alone would cancel it and send it again."""
    from reward_service.client import RewardClient, attempt_timeout_s, time_budget_s
    from tests.faults import HELD_PACE_S

    handle = service["held"]
    prompts, responses = [p for p, _ in WORLD_ITEMS], [r for _, r in WORLD_ITEMS]
    client = RewardClient(handle, timeout_s=2, retries=1, call_items_per_s=1.0)  # 2 + 2 * 4 / 1 = 10 s
    share_of_timeout_s = attempt_timeout_s(time_budget_s(2, 1, len(prompts), None), 0, 1)  # 1 s
    assert share_of_timeout_s < len(prompts) * HELD_PACE_S  # 2 s: past it without the batch's part
    items_before = handle.stats.remote().result(timeout_s=30)["items"]
    start = time.monotonic()
    scores = client(prompts, responses)
    took = time.monotonic() - start
    assert scores == [gold_reward(p, r) for p, r in WORLD_ITEMS]
    assert took > share_of_timeout_s
    # One attempt: a second one would have been scored too before the call returned.
    assert handle.stats.remote().result(timeout_s=30)["items"] - items_before == len(prompts)


def test_a_call_a_replica_holds_without_an_answer_is_retried_and_given_up_within_its_budget(service):
    """Each attempt waits its share and no longer, so a replica that never answers (on a dead
    node) costs the call one share, not its whole budget; when none answers, RewardError comes
    at the end of the budget, grown for the batch, and not later."""
    from reward_service.client import RewardClient, RewardError, time_budget_s

    handle, hold = service["held"], Path(os.environ["TAME_TEST_HOLD"])
    prompts, responses = [p for p, _ in WORLD_ITEMS[:2]], [r for _, r in WORLD_ITEMS[:2]]
    client = RewardClient(handle, timeout_s=1, retries=2, call_items_per_s=4.0)
    budget = time_budget_s(1, 2, len(prompts), 4.0)
    assert budget == 2.5  # 1 + 3 * 2 / 4
    hold.touch()
    try:
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"no reward after 3 attempt\(s\) within 2\.5s") as err:
            client(prompts, responses)
        took = time.monotonic() - start
    finally:
        hold.unlink()
    assert len(re.findall(r"attempt \d: \w*TimeoutError", str(err.value))) == 3, err.value  # each gave up waiting
    assert budget - 0.05 < took < budget + 5  # slack for the cancels on a busy machine
    # Released, the replica answers again (after the held batch: calls on one replica queue).
    golds = [gold_reward(p, r) for p, r in WORLD_ITEMS[:2]]
    assert handle.score.remote(prompts, responses).result(timeout_s=60) == golds


def test_a_stopping_replica_answers_the_requests_it_holds(service):
    """Deleting an application while a request is in flight answers that request first: the
    replica's stop waits for it (up to Serve's graceful timeout), however often it polls."""
    from ray import serve

    from cluster.demo.world import gold_reward

    prompt, response = WORLD_ITEMS[1]
    answer = service["slow"].score.remote([prompt], [response])  # a second in the replica
    deadline = time.monotonic() + 30
    while service["slow"].stats.remote().result()["forward_passes"] == 0:  # until it is being scored
        assert time.monotonic() < deadline
        time.sleep(0.05)
    serve.delete("test-reward-slow")  # returns once the replica has stopped
    assert answer.result(timeout_s=30) == [gold_reward(prompt, response)]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cluster.demo.world:no_such_function", "has no attribute 'no_such_function'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("cluster.demo.world:N_ENTITIES", "is not callable"),
    ],
)
def test_bad_reward_function_is_a_config_error_at_start_up(tiny_assets, spec, message):
    from reward_service.service import deploy

    cfg = _cfg(tiny_assets.reward, 8000, functions=[{"function": "cluster.demo.world:gold_reward"}, {"function": spec}])
    with pytest.raises(ConfigError, match=r"reward\.functions\[1\]\.function: .*" + message):
        deploy(cfg, http=False)


def test_a_missing_reward_model_is_a_config_error_at_start_up(tmp_path):
    from reward_service.service import deploy

    with pytest.raises(ConfigError, match="model.reward: .*missing is not a Hugging Face model folder"):
        deploy(_cfg(tmp_path / "missing", 8000), http=False)


def _without_chat_template(tiny_assets, tmp_path) -> Path:
    folder = tmp_path / "reward"
    shutil.copytree(tiny_assets.reward, folder)
    (folder / "chat_template.jinja").unlink()
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    return folder


def test_a_reward_tokenizer_without_the_chat_template_asked_for_is_a_config_error_at_start_up(tiny_assets, tmp_path):
    """Else every POST /v1/score answers 500 (apply_chat_template raises) while /healthz says ok."""
    from reward_service.rewards import check_reward_config
    from reward_service.service import deploy

    folder = _without_chat_template(tiny_assets, tmp_path)
    message = (
        f"data.chat_template is true, but the tokenizer of model.reward ({folder}) has no chat template: "
        "set data.chat_template false, or give the tokenizer one (chat_template.jinja in its folder)"
    )
    with pytest.raises(ConfigError) as err:
        deploy(_cfg(folder, 8000), http=False)
    assert str(err.value) == message
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "serve-reward", "--model", str(folder), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert f"tame serve-reward: error: {message}\n" in out.stderr
    assert "local Ray" not in out.stderr  # said before Ray starts
    raw_text = _cfg(folder, 8000).model_copy(update={"data": DataConfig(chat_template=False)})
    check_reward_config(raw_text)  # the raw text needs no template


TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize(
    "template, has_one",
    [
        (None, False),
        (TEMPLATE, True),
        ([{"name": "default", "template": TEMPLATE}], True),
        ([{"name": "tool_use", "template": TEMPLATE}], False),  # named templates, none the default
    ],
)
def test_has_chat_template_agrees_with_transformers(tiny_assets, tmp_path, template, has_one):
    from transformers import AutoTokenizer

    from cluster.shared.tokens import has_chat_template

    folder = _without_chat_template(tiny_assets, tmp_path)
    if template is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        prompt_token_ids(tokenizer, "Where does Anna live?")
        templated = True
    except ValueError:
        templated = False
    assert has_chat_template(folder) == templated == has_one
    assert has_chat_template(tiny_assets.reward)  # chat_template.jinja


def test_replicas_resources_and_autoscaling_come_from_the_config(tiny_assets):
    from reward_service.service import RewardDeployment, deployment_options

    fixed = RewardDeployment.options(**deployment_options(_cfg(tiny_assets.reward, 8000, replicas=3, num_gpus=0.5)))
    assert fixed.num_replicas == 3
    assert fixed.ray_actor_options == {"num_cpus": 0.25, "num_gpus": 0.5, "runtime_env": {"env_vars": {}}}
    auto_cfg = _cfg(
        tiny_assets.reward, 8000, autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}
    )
    auto = RewardDeployment.options(**deployment_options(auto_cfg))
    scaling = auto._deployment_config.autoscaling_config  # Serve has no public accessor for it
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 3)
