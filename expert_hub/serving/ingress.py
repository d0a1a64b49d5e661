"""The endpoint of `serve --replicas` (`replicas.py`): a Ray Serve ingress in front of the replicas.

Per request it
- checks the API key (as the single server does: every route but `/health`, and `/metrics` unless public);
- finds the task the request names (`model`, `{"task": ...}` or `X-Expert-Task`); for `"auto"` it asks one replica
  where auto routing sends the prompt (`POST /v1/route/...`), once, and names that task in the request;
- sends the request through Ray Serve with the task as the multiplexed model id, so it goes to a replica that
  served the task lately, and streams the replica's answer back; a replica that fails before answering gives a 503.
  Everything else about a request (checks, refusals, waiting for the task) is the replica's own server's.
- answers the routes that concern every replica from all of them: `GET /v1/tasks` (each task's residency per
  replica), `POST` / `DELETE /v1/tasks/{name}` (on every replica, all or none for a POST), `/metrics` (every
  replica's series with a `replica` label) and `/health` (200 while a replica is up).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from expert_hub.registry import AUTO

from .asgi import json_object
from .middleware import TASK_ROUTES
from .replica_directory import ChildServer, auth_header, replica_directory
from .serving_state import ApiKeys, error_body

if TYPE_CHECKING:
    from prometheus_client import Metric

_NOT_FORWARDED = frozenset({b"host", b"authorization", b"content-length", b"connection", b"transfer-encoding"})
_NOT_RETURNED = frozenset({"content-length", "transfer-encoding", "connection", "date", "server"})


def ingress_deployment(api_key: str | None, public_metrics: bool):
    """The ingress deployment class (Ray imported only by `serve --replicas`)."""
    from ray import serve

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    keys = ApiKeys([api_key] if api_key else [], frozenset({"/health", "/metrics"} if public_metrics else {"/health"}))

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
    @serve.ingress(app)
    class Ingress:
        def __init__(self, replicas) -> None:
            self.replicas = replicas
            self.base_names: frozenset[str] | None = None  # the names the replicas serve the base model under

        @app.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
        async def handle(self, path: str, request: Request) -> Response:
            path = "/" + path
            preflight = request.method == "OPTIONS" and "access-control-request-method" in request.headers
            if not preflight and not keys.allow(request.scope, path):
                return Response(
                    error_body(401, "Unauthorized: give the API key as 'Authorization: Bearer KEY'"),
                    401,
                    {"www-authenticate": "Bearer"},
                    media_type="application/json",
                )
            if path == "/health":
                healthy = await _on_every_replica("GET", "/health", timeout=5)
                return Response(status_code=200 if any(answer.status_code == 200 for _, answer in healthy) else 503)
            if path == "/metrics":
                return Response(await _metrics(), media_type="text/plain; version=0.0.4")
            if path == "/v1/tasks" and request.method == "GET":
                try:
                    return _json(await _list_tasks(request.url.query))
                except _Refused as refusal:
                    return refusal.response()
            if path.startswith("/v1/tasks/") and request.method in ("POST", "DELETE"):
                status, body = await _change_task(request.method, path)
                return Response(body, status, media_type="application/json")
            return await self._forward(request, path, await request.body())

        async def _forward(self, request: Request, path: str, body: bytes) -> Response:
            headers = [(name, value) for name, value in request.headers.raw if name.lower() not in _NOT_FORWARDED]
            task, extra = None, {}
            if path in TASK_ROUTES and request.method == "POST":
                payload = json_object(body)
                try:
                    task = _named_task(request, payload, await self._base_names())
                    if task == AUTO and payload is not None:
                        task, payload = await self._route(path, payload, headers)
                        body, extra = json.dumps(payload).encode(), {"x-expert-task-chosen": payload["model"]}
                        headers = [(name, value) for name, value in headers if name.lower() != b"x-expert-task"]
                except _Refused as refusal:
                    return refusal.response()
                except Exception as error:  # a replica lost while asked (Ray's errors, a connection refused)
                    return _error(503, f"no replica could route this request ({_short(error)}); retry")
            handle = self.replicas.options(stream=True, multiplexed_model_id=task or "")
            answer = handle.forward.remote(request.method, path, request.url.query.encode(), headers, body)
            try:
                start = await answer.__anext__()
            except Exception as error:
                return _error(503, f"the replica serving this request failed ({_short(error)}); retry")
            returned = {k: v for k, v in start["headers"] if k.lower() not in _NOT_RETURNED} | extra
            media = dict(start["headers"]).get("content-type", "")
            return StreamingResponse(_rest(answer, media), start["status"], headers=returned)

        async def _route(self, path: str, payload: dict, headers: list) -> tuple[str | None, dict]:
            """Where auto routing sends this request (asked of one replica), and the request naming it."""
            chosen = self.replicas.options(stream=True).forward.remote(
                "POST", "/v1/route" + path.removeprefix("/v1"), b"", headers, json.dumps(payload).encode()
            )
            start, body = await chosen.__anext__(), b"".join([chunk async for chunk in chosen])
            if start["status"] != 200:
                raise _Refused(start["status"], body)
            task = json.loads(body)["task"]
            request = {key: value for key, value in payload.items() if key != "task"}
            return task, request | {"model": task or sorted(await self._base_names())[0]}

        async def _base_names(self) -> frozenset[str]:
            if self.base_names is None:
                if not (children := await _children()):
                    raise _Refused(503, error_body(503, "no replica is serving yet; retry"))
                async with _client(children[0]) as client:
                    listing = (await client.get("/v1/models")).json()["data"]
                self.base_names = frozenset(model["id"] for model in listing if not model.get("parent"))
            return self.base_names

    return Ingress


class _Refused(Exception):
    """A replica's refusal, passed on as it is."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body

    def response(self) -> Response:
        return Response(self.body, self.status, media_type="application/json")


def _named_task(request, payload: dict | None, base_names: frozenset[str]) -> str | None:
    """The task the request names, for routing only: the replica's server checks the request itself, and refuses
    one that names several tasks (sent to it as it is)."""
    named = [request.headers.get("x-expert-task", "").strip()]
    if payload is not None:
        named += [payload.get("task"), payload.get("model")]
    tasks = {name for name in named if isinstance(name, str) and name and name not in base_names}
    return tasks.pop() if len(tasks) == 1 else None


async def _rest(answer, media: str):
    """The rest of the replica's answer; a replica lost mid-stream ends an event stream with an error event."""
    try:
        async for chunk in answer:
            yield chunk
    except Exception as error:
        if not media.startswith("text/event-stream"):
            raise  # the connection is cut: a body that ends early must not look whole
        message = f"the replica serving this request failed ({_short(error)}); retry"
        yield b"data: " + error_body(503, message) + b"\n\n"


async def _children() -> list[ChildServer]:
    return await replica_directory().children.remote()


def _client(child: ChildServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=child.url, headers=auth_header(child.key), timeout=None)


async def _on_every_replica(
    method: str, path: str, query: str = "", timeout: float | None = None
) -> list[tuple[ChildServer, httpx.Response]]:
    """`method path` on every replica's server at once; replicas that cannot be reached (gone) are left out."""

    async def call(child: ChildServer):
        async with _client(child) as client:
            return child, await client.request(method, path, params=query, timeout=timeout)

    answers = await asyncio.gather(*(call(child) for child in await _children()), return_exceptions=True)
    return [answer for answer in answers if not isinstance(answer, BaseException)]


async def _list_tasks(query: str) -> dict:
    """The replicas' task listings in one: each task's residency, requests in flight and waiting per replica
    (`replicas`) and summed; each replica's bank and scheduler under `replicas`."""
    responses = await _on_every_replica("GET", "/v1/tasks", query)
    if refused := next((response for _, response in responses if response.status_code != 200), None):
        raise _Refused(refused.status_code, refused.content)  # a bad page: every replica says the same
    answers = [(child, response.json()) for child, response in responses]
    if not answers:
        return {"object": "list", "data": [], "replicas": []}
    tasks: dict[str, dict] = {}
    for child, listing in answers:
        for task in listing["data"]:
            merged = tasks.setdefault(task["id"], task | {"resident": False, "in_flight": 0, "waiting": 0})
            merged["resident"] |= task["resident"]
            merged["in_flight"] += task["in_flight"]
            merged["waiting"] += task["waiting"]
            here = {key: task[key] for key in ("resident", "in_flight", "waiting", "last_load")}
            merged.setdefault("replicas", {})[child.replica] = here
    listing = answers[0][1] | {"data": [tasks[name] for name in sorted(tasks)]}
    listing["has_more"] = any(each["has_more"] for _, each in answers)
    del listing["bank"], listing["scheduler"]
    return listing | {
        "replicas": [
            {"replica": c.replica, "bank": each["bank"], "scheduler": each["scheduler"]} for c, each in answers
        ]
    }


async def _change_task(method: str, path: str) -> tuple[int, bytes]:
    """POST or DELETE a task on every replica: 200 when every replica did it (a DELETE also where the task was
    gone), else the first refusal, the replicas that did it keeping it so (the same call again completes it).

    The change is kept for replicas started later before the replicas are asked (a replica starting meanwhile
    replays it), a POST's then as the replicas resolved it (`law@3`); one no replica took is forgotten."""
    name = path.removeprefix("/v1/tasks/")
    task = name.partition("@")[0]
    before = await replica_directory().record.remote(task, name, "added" if method == "POST" else "removed")
    answers = await _on_every_replica(method, path)
    done = [(child, response) for child, response in answers if response.status_code < 400]
    if not done:
        await replica_directory().restore.remote(task, before)
    if not answers:
        return 503, error_body(503, "no replica is running; retry")
    refused = [response for _, response in answers if response.status_code >= 400]
    gone = method == "DELETE" and all(response.status_code in (200, 404) for _, response in answers)
    if refused and not (gone and done):
        return refused[0].status_code, refused[0].content
    body = done[0][1].json()
    if method == "POST" and body.get("version") is not None:
        await replica_directory().record.remote(task, f"{body['task']}@{body['version']}", "added")
    return 200, json.dumps(body | {"replicas": sorted(child.replica for child, _ in done)}).encode()


async def _metrics() -> bytes:
    """Every replica's metrics, each series labelled with its replica."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for child, response in await _on_every_replica("GET", "/metrics"):
        for family in text_string_to_metric_families(response.text):
            merged = families.setdefault(family.name, family)
            if merged is not family:
                merged.samples += [s._replace(labels=s.labels | {"replica": child.replica}) for s in family.samples]
            else:
                family.samples = [s._replace(labels=s.labels | {"replica": child.replica}) for s in family.samples]

    class _Merged:
        def collect(self):
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def _json(payload: dict) -> Response:
    return Response(json.dumps(payload).encode(), media_type="application/json")


def _error(status: int, message: str) -> Response:
    return Response(error_body(status, message), status, media_type="application/json")


def _short(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
