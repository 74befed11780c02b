"""The reward service: one Ray Serve deployment, reached by deployment handle and over HTTP.

Rollout actors call `handle.score_items.remote(prompts, responses)` through `RewardClient`
(no HTTP inside the cluster; `handle.score` answers the rewards alone); people and other
programs call `POST /v1/score`. Every path ends in the same `_scored` method, which queues
each item into `serve.batch`, so concurrent callers share forward passes (one per reward
model of an ensemble), and the reward (aggregated model score plus weighted rule functions)
is the same figure whichever way it was asked for.

Replicas and their CPUs/GPUs come from `cfg.reward` and change without touching the
learner or the actors; Serve's autoscaling settings pass through. HTTP binds
`cfg.reward.host` (127.0.0.1 by default); when the environment variable named by
`cfg.reward.token_env` is set, `/v1/score` requires `Authorization: Bearer <token>`
(`/healthz` stays open for load balancers).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import api as serve_api
from ray.serve.handle import DeploymentHandle

from cluster.shared.config import TameConfig
from cluster.shared.errors import RunError
from cluster.shared.ray_cluster import connect_ray, started_here
from cluster.shared.records import Scores
from cluster.shared.resources import ask, check_cluster, gpu_env, roles
from cluster.shared.startup import Pending, wait_until_up
from reward_service.api import Limits, RequestError, ScoreResponse, parse_score_request
from reward_service.rewards import ItemReward, RewardSum, UnscorableItemError, check_reward_config

REPLICA_HEADER = "x-tame-replica"
"""Response header naming the replica that answered (which replica served is useful when
debugging a deployment with several)."""

SHUTDOWN_POLL_S = 0.1
"""How often a stopping replica checks that its requests in flight have finished."""

app = FastAPI(title="tame reward service", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(RequestError)
async def _client_error(request: Request, error: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse({"detail": error.detail}, status_code=error.status, headers=headers)


def _count_items(chunks: list[list[tuple[str, str]]]) -> int:
    """Batch size in items (for serve.batch), where each queued entry is a chunk of items."""
    return sum(len(chunk) for chunk in chunks)


# Serve's status, logs and replica names show this name: the class's, since a deployment may
# hold no model at all (rule functions only).
@serve.deployment(name="RewardDeployment")
@serve.ingress(app)
class RewardDeployment:
    """One replica: a `RewardSum` (model and/or rule functions) behind a dynamic batcher."""

    def __init__(self, cfg: TameConfig, token: str | None):
        import torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(cfg.reward.threads or max(1, int(cfg.reward.num_cpus)))
        device = "cuda" if cfg.reward.num_gpus > 0 else "cpu"
        self._reward = RewardSum.from_config(cfg, device=device)
        self._limits = Limits(cfg.reward.max_items, cfg.reward.max_chars)
        self._token = token.encode() if token else None
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._max_batch_size = cfg.reward.max_batch_size
        self._forward_passes, self._items_scored, self._largest_batch = 0, 0, 0
        self._batch.set_max_batch_size(cfg.reward.max_batch_size)
        self._batch.set_batch_wait_timeout_s(cfg.reward.batch_wait_timeout_s)

    # -- the one scoring path --------------------------------------------------------

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=_count_items)
    async def _batch(self, chunks: list[list[tuple[str, str]]]) -> list[list[ItemReward | UnscorableItemError]]:
        """Score chunks of items from any callers in one forward pass per reward model; answer
        chunk by chunk."""
        flat = [item for chunk in chunks for item in chunk]
        self._forward_passes += 1
        self._items_scored += len(flat)
        self._largest_batch = max(self._largest_batch, len(flat))
        # The forward pass runs in a thread so the event loop keeps taking requests (and
        # filling the next batch) meanwhile.
        scores = await asyncio.to_thread(self._reward.score_each, [p for p, _ in flat], [r for _, r in flat])
        answers, start = [], 0
        for chunk in chunks:
            answers.append(scores[start : start + len(chunk)])
            start += len(chunk)
        return answers

    async def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Rewards of (prompt, response) pairs, in order: the handle API of the deployment.
        Raises UnscorableItemError (a ValueError) naming the first item a rule function or a
        reward model could not score."""
        return [item.reward for item in await self._scored(prompts, responses)]

    async def score_items(self, prompts: list[str], responses: list[str]) -> Scores:
        """`score`, with the spread of the reward models' scores of each item (what
        `RewardClient(with_spread=True)` asks for)."""
        items = await self._scored(prompts, responses)
        return Scores(rewards=[item.reward for item in items], reward_std=[item.reward_std for item in items])

    async def _scored(self, prompts: list[str], responses: list[str]) -> list[ItemReward]:
        """Every item's reward, through the batcher.

        A request enters the batcher in chunks of at most `max_batch_size` items (not item
        by item: per-entry queueing costs more than a tiny model's forward pass), and the
        batcher packs chunks of concurrent callers up to `max_batch_size` items.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        pairs = list(zip(prompts, responses))
        size = self._max_batch_size
        parts = await asyncio.gather(*(self._batch(pairs[i : i + size]) for i in range(0, len(pairs), size)))
        scores = [s for part in parts for s in part]
        for i, s in enumerate(scores):
            if isinstance(s, UnscorableItemError):
                raise UnscorableItemError(f"items.{i}: {s}")
        return scores

    def replica(self) -> str:
        """Id of the replica that answers (for tests and debugging)."""
        return self._replica

    def stats(self) -> dict:
        """This replica's batching so far: forward passes, items scored, largest batch."""
        return {
            "replica": self._replica,
            "forward_passes": self._forward_passes,
            "items": self._items_scored,
            "largest_batch": self._largest_batch,
        }

    # -- HTTP ------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), self._token
        ):
            raise RequestError(401, "missing or wrong bearer token")

    async def _body(self, request: Request) -> bytes:
        """The request body, read chunk by chunk up to the size limit: a chunked upload has no
        Content-Length to refuse it by, and must not be held whole before it is found too large."""
        limit = self._limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"body of {declared} bytes is larger than {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"body of at least {len(body)} bytes is larger than {limit}")
        return bytes(body)

    @app.post("/v1/score")
    async def http_score(self, request: Request) -> JSONResponse:
        self._authorize(request)
        parsed = parse_score_request(await self._body(request), self._limits)
        try:
            items = await self._scored([it.prompt for it in parsed.items], [it.response for it in parsed.items])
        except UnscorableItemError as e:
            raise RequestError(422, str(e)) from None
        answer = ScoreResponse(
            scores=[item.reward for item in items],
            members=[list(item.member_scores) for item in items] if parsed.members else None,
        )
        return JSONResponse(answer.model_dump(exclude_none=True), headers={REPLICA_HEADER: self._replica})

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"}, headers={REPLICA_HEADER: self._replica})


# --------------------------------------------------------------------------- deployment


def _absolute_model_path(cfg: TameConfig) -> TameConfig:
    """Replicas may run in another working directory: give them an absolute model path."""
    if cfg.model.reward is None:
        return cfg
    model = cfg.model.model_copy(update={"reward": str(Path(cfg.model.reward).resolve())})
    return cfg.model_copy(update={"model": model})


def deployment_options(cfg: TameConfig) -> dict:
    """Serve options of the reward deployment, all from `cfg.reward`."""
    r = cfg.reward
    options: dict = {
        "ray_actor_options": {
            "num_cpus": r.num_cpus,
            "num_gpus": r.num_gpus,
            "runtime_env": {"env_vars": gpu_env(r.num_gpus)},
        },
        # Enough requests in flight per replica to fill a batch from single-item callers.
        "max_ongoing_requests": max(r.max_batch_size, 8),
        # Serve's default poll (2 s) makes every replica's stop wait at least that long, idle
        # or not; requests in flight still get Serve's graceful timeout (20 s) to finish.
        "graceful_shutdown_wait_loop_s": SHUTDOWN_POLL_S,
    }
    if r.autoscaling is not None:
        options["autoscaling_config"] = r.autoscaling.model_dump()
    else:
        options["num_replicas"] = r.replicas
    return options


def deploy(
    cfg: TameConfig, *, http: bool = True, name: str = "tame-reward", route_prefix: str = "/", wait: bool = True
) -> DeploymentHandle:
    """Run the reward deployment on the connected Ray cluster and return its handle.

    The model comes from `cfg.model.reward` (or none: rule functions only), the chat
    template flag from `cfg.data.chat_template`, HTTP from `cfg.reward.host`/`port` (the
    Serve proxy is cluster-wide: if Serve already runs, its HTTP options stay). A bad
    `module:function` or a missing model folder raises ConfigError here, before any replica
    starts. `route_prefix` lets several reward applications share one proxy. With `wait`
    false it returns before the replicas are up: the caller watches `app_running(name)`.
    """
    check_reward_config(cfg)
    cfg = _absolute_model_path(cfg)
    token = os.environ.get(cfg.reward.token_env) or None
    if http:
        serve.start(http_options={"host": cfg.reward.host, "port": cfg.reward.port})
    else:
        serve.start(proxy_location="Disabled")
    application = RewardDeployment.options(**deployment_options(cfg)).bind(cfg, token)
    return serve_api._run(application, _blocking=wait, name=name, route_prefix=route_prefix if http else None)


def app_running(name: str = "tame-reward") -> bool:
    """Whether the reward application's replicas are all up. A RunError when it failed to
    deploy (a replica's constructor raised)."""
    status = serve.status().applications.get(name)
    if status is not None and status.status == "DEPLOY_FAILED":
        raise RunError(f"the reward service failed to start: {status.message}")
    return status is not None and status.status == "RUNNING"


def coming_up(cfg: TameConfig, name: str = "tame-reward") -> Pending:
    """The reward service as a role the start waits for (`cluster.shared.startup`)."""
    (role,) = roles(cfg, only=("reward",))
    return Pending(
        "the reward service", f"{role.count_field} x {ask(role)}", lambda: app_running(name), tuple(role.each)
    )


def serve_forever(cfg: TameConfig, log=print) -> None:
    """`tame serve-reward`: deploy, print the URL once the replicas are up (within
    `cluster.start_timeout_s`, saying every 10 s what is pending), block until Ctrl-C, then
    shut down cleanly.

    Connects to `cfg.cluster.address` (or RAY_ADDRESS) when given, else starts a local Ray.
    On a shared cluster only this application is deleted; a local Ray is shut down whole.
    """
    import ray

    connect_ray(cfg.cluster.address, cfg.cluster.num_cpus, log)
    check_cluster(cfg, only=("reward",))  # replicas no node can hold would wait in Ray's queue forever
    name = "tame-reward"
    deploy(cfg, http=True, name=name, wait=False)
    try:
        wait_until_up([coming_up(cfg, name)], cfg.cluster.start_timeout_s, log, what="the reward service")
        url = f"http://{cfg.reward.host}:{cfg.reward.port}"
        auth = f"; bearer token from ${cfg.reward.token_env}" if os.environ.get(cfg.reward.token_env) else ""
        log(f"reward service at {url}  (POST {url}/v1/score, GET {url}/healthz{auth}); Ctrl-C stops it")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("stopping the reward service")
    finally:
        if started_here():  # Serve goes with the local Ray, replicas and all
            ray.shutdown()
        else:
            serve.delete(name)
