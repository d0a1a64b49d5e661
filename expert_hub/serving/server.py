"""`expert-hub serve`: vLLM's OpenAI-compatible server, plus tasks.

vLLM's own server handles chat, completions, streaming, `/health` and `/metrics`. This module adds:
- task selection: `model` = a task name, or `{"task": ...}` in the body (`extra_body`), or an `X-Expert-Task`
  header; the request then runs on the base model with `vllm_xargs.task` (read by the worker to pick the remap
  row) and a per-task `cache_salt` (so prefix caching never shares KV blocks between tasks);
- `/v1/models` listing every task with the base as parent; `GET /v1/tasks` (residency, the bank);
  `POST` / `DELETE /v1/tasks/{name}`;
- per-task request and token counters in `/metrics`.
All routes sit under `/v1`, so vLLM's `--api-key` check covers them.
"""

from __future__ import annotations

import json
import logging
import time
from argparse import Namespace

from prometheus_client import Counter

from expert_hub.errors import InvalidInputError

from .tasks import TaskError, TaskManager, cache_salt

logger = logging.getLogger(__name__)
TASK_REQUESTS = Counter("expert_hub_task_requests", "Requests per task (base = no task)", ["task"])
TASK_PROMPT_TOKENS = Counter("expert_hub_task_prompt_tokens", "Prompt tokens per task", ["task"])
TASK_COMPLETION_TOKENS = Counter("expert_hub_task_completion_tokens", "Generated tokens per task", ["task"])
_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
MANAGER: TaskManager | None = None  # set by `serve` before the first request
BASE_NAME: str = ""


def _error(status: int, message: str, kind: str = "invalid_request_error") -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return status, json.dumps(body).encode()


class TaskRouting:
    """Pure ASGI middleware: resolves a request's task, pins it, rewrites the body for vLLM, counts usage."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path.startswith("/v1") and not _authorized(scope):  # before any task is loaded on the caller's behalf
            await _read_body(receive)
            return await _respond(send, *_error(401, "Unauthorized", "AuthenticationError"))
        if path.startswith("/v1/tasks/") and method in ("POST", "DELETE"):
            return await self._manage(scope, receive, send, path.removeprefix("/v1/tasks/"), method)
        if path == "/v1/tasks" and method == "GET":
            await _read_body(receive)
            return await _respond(send, 200, json.dumps(await MANAGER.describe()).encode())
        if path == "/v1/models" and method == "GET":
            return await self._models(scope, receive, send)
        if method != "POST" or path not in _GENERATION_PATHS:
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        headers = dict(scope["headers"])
        task = None
        if isinstance(request, dict):
            task = request.pop("task", None) or headers.get(b"x-expert-task", b"").decode() or None
            if task is None and request.get("model") in MANAGER.known:
                task = request["model"]
            if task == BASE_NAME:
                task = None
        if task is None:
            TASK_REQUESTS.labels(task="base").inc()
            return await _run_counted(self.app, scope, _replay(body, receive), send, "base")
        try:
            await MANAGER.acquire(task)
        except TaskError as error:
            return await _respond(send, *_error(error.status, str(error),
                                                "NotFoundError" if error.status == 404 else "ServiceUnavailable"))
        try:
            TASK_REQUESTS.labels(task=task).inc()
            request["model"] = BASE_NAME
            request["vllm_xargs"] = {**(request.get("vllm_xargs") or {}), "task": task}
            salt = request.get("cache_salt")
            request["cache_salt"] = cache_salt(task) + (f"-{salt}" if salt else "")
            body = json.dumps(request).encode()
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-length"]
                         + [(b"content-length", str(len(body)).encode())])
            await _run_counted(self.app, scope, _replay(body, receive), _rename_model(task, send), task)
        finally:
            MANAGER.release(task)

    async def _manage(self, scope, receive, send, name: str, method: str) -> None:
        await _read_body(receive)
        try:
            if method == "POST":
                started = time.perf_counter()
                task = await MANAGER.add(name)
                payload = {"task": name, "resident": True, "bytes": task.nbytes,
                           "seconds": round(time.perf_counter() - started, 4)}
            else:
                await MANAGER.remove(name)
                payload = {"task": name, "resident": False}
        except TaskError as error:
            return await _respond(send, *_error(error.status, str(error)))
        await _respond(send, 200, json.dumps(payload).encode())

    async def _models(self, scope, receive, send) -> None:
        """vLLM's model list plus one entry per servable task, parented to the base model."""
        chunks, start = [], {}

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            listing = json.loads(body)
            created = int(time.time())
            listing["data"] += [{"id": name, "object": "model", "created": created, "owned_by": "expert-hub",
                                 "root": BASE_NAME, "parent": BASE_NAME, "permission": []}
                                for name in sorted(MANAGER.known)]
            body = json.dumps(listing).encode()
        await _respond(send, start.get("status", 500), body)


_API_KEYS: tuple[str, ...] = ()


def _authorized(scope) -> bool:
    if not _API_KEYS:
        return True
    header = dict(scope["headers"]).get(b"authorization", b"").decode()
    return header.startswith("Bearer ") and header.removeprefix("Bearer ") in _API_KEYS


async def _read_body(receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls see the client's disconnect

    return replay


async def _respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _rename_model(task: str, send):
    """Responses name the task, not the base model they ran on (content-length fixed for plain bodies)."""
    old, new = f'"model":"{BASE_NAME}"'.encode(), f'"model":"{task}"'.encode()
    held = {}

    async def renaming(message):
        if message["type"] == "http.response.start":
            held.update(message)
            return
        if message["type"] == "http.response.body":
            chunk = message.get("body", b"").replace(old, new)
            if held:
                headers = [(k, v) for k, v in held["headers"] if k != b"content-length"]
                if not message.get("more_body", False):
                    headers.append((b"content-length", str(len(chunk)).encode()))
                await send({**held, "headers": headers})
                held.clear()
            return await send({**message, "body": chunk})
        return await send(message)

    return renaming


async def _run_counted(app, scope, receive, send, task: str) -> None:
    """Run the request, then add its token usage to the task's counters.

    vLLM's completion and chat handlers leave the usage in `request.state.request_metadata.final_usage_info` for
    middleware, streamed or not (a stream carries it in its body only when the client asks for it).
    """
    state = scope.setdefault("state", {})  # Starlette's `request.state` writes into this dict
    await app(scope, receive, send)
    usage = getattr(state.get("request_metadata"), "final_usage_info", None)
    if usage is not None:
        TASK_PROMPT_TOKENS.labels(task=task).inc(usage.prompt_tokens or 0)
        TASK_COMPLETION_TOKENS.labels(task=task).inc(usage.completion_tokens or 0)


async def serve(args: Namespace, tasks: dict, max_resident: int, registry, base: str) -> None:
    """Start the engine with the bank worker, load the initial tasks, then serve HTTP until stopped."""
    global MANAGER, BASE_NAME, _API_KEYS
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    BASE_NAME = args.served_model_name[0] if args.served_model_name else args.model
    _API_KEYS = tuple(args.api_key or ())
    _, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine:
        try:
            MANAGER = TaskManager(engine, dict(tasks), max_resident, registry, base)
            bank = await MANAGER.bank()
            if not bank["rows_per_layer"]:
                raise InvalidInputError(f"the expert bank holds no expert: one expert row in every MoE layer takes "
                                        f"{bank['bytes_per_row'] / 2**20:.1f} MiB; give a larger --expert-bank-gb")
            if not await MANAGER.check_layout():
                logger.warning("the base checkpoint has no per-expert tensors to check the bank's weight layout with")
            for name in list(tasks)[:max_resident]:
                await MANAGER.ensure_resident(name)
            supported = await engine.get_supported_tasks()
            args.middleware = [*args.middleware, f"{__name__}.TaskRouting"]  # build_app freezes the middleware stack
            app = build_app(args, supported, engine.model_config)
            await init_app_state(engine, app.state, args, supported)
            shutdown = await serve_http(app, sock=sock, host=args.host, port=args.port,
                                        log_level=args.uvicorn_log_level, enable_ssl_refresh=False)
        finally:
            MANAGER = None  # the engine shuts down with this block: nothing may keep it until interpreter exit
    await shutdown
