"""`expert-hub serve`: vLLM's OpenAI-compatible server, plus tasks.

vLLM's own server handles generation, streaming, `/health` and `/metrics`. The `TaskRouting` middleware, outermost
in the stack, adds:
- the API key on every route but `/health` (and `/metrics` with `--public-metrics`), compared in constant time;
- task selection on the generating endpoints (`TASK_ROUTES`): `model` = a task name, `{"task": ...}` in the body,
  or an `X-Expert-Task` header; the request then runs on the base model with the task's private key in
  `vllm_xargs` and its cache salt (see `tasks.py`), and its task is pinned until the response ends. A task selector
  on any other endpoint is refused with a 400 naming the endpoint, never answered by the base model;
- `/v1/models` listing every task with the base as parent; `GET /v1/tasks` (residency, the bank);
  `POST` / `DELETE /v1/tasks/{name}`;
- per-task request counters (token counters: `metrics.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from argparse import Namespace

from expert_hub.errors import InvalidInputError

from .bank import TASK_ARG
from .metrics import TASK_REQUESTS, count_tokens
from .tasks import Task, TaskError, TaskManager

logger = logging.getLogger(__name__)
# Endpoints whose requests carry `model`, `vllm_xargs` and `cache_salt` at the top level and generate: a task runs here.
TASK_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/responses",
                         "/v1/messages", "/invocations"})
# Endpoints that only use the tokenizer, which every task shares: a task name is checked, the base answers.
TOKENIZER_ROUTES = frozenset({"/tokenize", "/detokenize", "/v1/messages/count_tokens"})
MANAGER: TaskManager | None = None  # set by `serve` before the first request
BASE_NAMES: tuple[str, ...] = ()  # the served model's names; the first is the one vLLM answers with


class ApiKeys:
    """Bearer keys, compared in constant time; an empty set lets everything through."""

    def __init__(self, keys: list[str], public_paths: frozenset[str]):
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.public_paths = public_paths

    def allow(self, scope, path: str) -> bool:
        if not self._digests or path in self.public_paths:
            return True
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        digest = hashlib.sha256(token.encode("latin-1")).digest()
        matched = False
        for expected in self._digests:  # no early exit: the time taken does not depend on which key matched
            matched |= secrets.compare_digest(digest, expected)
        return scheme.lower() == "bearer" and matched


def _is_preflight(scope) -> bool:
    """A CORS preflight (answered by vLLM's CORS middleware, which runs nothing): browsers send it without a key."""
    return scope["method"] == "OPTIONS" and any(name == b"access-control-request-method"
                                                 for name, _ in scope["headers"])


API_KEYS = ApiKeys([], frozenset())


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 409: "ConflictError",
                422: "UnprocessableEntityError", 503: "ServiceUnavailableError", 507: "InsufficientStorageError"}


def _error(status: int, message: str) -> tuple[int, bytes]:
    """An OpenAI-style error body, typed as vLLM types its own."""
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "APIError"), "param": None, "code": status}}
    return status, json.dumps(body).encode()


def _task_error(error: TaskError) -> tuple[int, bytes]:
    return _error(error.status, str(error))


class TaskRouting:
    """Pure ASGI middleware: checks the key, resolves a request's task, pins it, rewrites the body for vLLM."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if scope["type"] == "http" and _is_preflight(scope):
            return await self.app(scope, receive, send)
        if not API_KEYS.allow(scope, path):  # before anything is read, loaded or answered on the caller's behalf
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _respond(send, *_error(401, "Unauthorized: give the API key as 'Authorization: Bearer KEY'"),
                                  [(b"www-authenticate", b"Bearer")])
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        method = scope["method"]
        if path.startswith("/v1/tasks/") and method in ("POST", "DELETE"):
            return await self._manage(receive, send, path.removeprefix("/v1/tasks/"), method)
        if path == "/v1/tasks" and method == "GET":
            await _read_body(receive)
            return await _respond(send, 200, json.dumps(await MANAGER.describe()).encode())
        if path == "/v1/models" and method == "GET":
            return await self._models(scope, receive, send)
        body = await _read_body(receive)
        request = _json_object(body)
        try:
            task = _requested_task(scope, request)
            if task is None and (path in TASK_ROUTES or path in TOKENIZER_ROUTES):
                _check_model_exists(scope, request)
        except TaskError as error:
            return await _respond(send, *_task_error(error))
        if path in TASK_ROUTES and method == "POST" and request is not None:
            return await self._run_task_request(scope, receive, send, request, body, task)
        if task is not None and path in TOKENIZER_ROUTES and request is not None:
            return await self._tokenize_for_task(scope, receive, send, request, task)
        if task is not None:
            return await _respond(send, *_error(400, f"{path} does not serve tasks: send task requests to "
                                                     f"{', '.join(sorted(TASK_ROUTES))}"))
        return await self.app(scope, _replay(body, receive), send)

    async def _run_task_request(self, scope, receive, send, request: dict, body: bytes, task: str | None):
        """Run a generating request as its task (or the base model when it names none)."""
        if task is None:
            TASK_REQUESTS.labels(task="base").inc()
            return await self.app(scope, _replay(body, receive), send)
        manager = MANAGER  # the request releases its task even if the server shuts down meanwhile
        try:
            _check_task_request(request)
            served = await manager.acquire(task)
        except TaskError as error:
            return await _respond(send, *_task_error(error))
        try:
            TASK_REQUESTS.labels(task=task).inc()
            body = json.dumps(_as_task_request(request, served)).encode()
            await self.app(_with_length(scope, body), _replay(body, receive), _rename_model(task, send))
        finally:
            manager.release(task)

    async def _tokenize_for_task(self, scope, receive, send, request: dict, task: str) -> None:
        """Every task shares the base model's tokenizer: the task only has to exist."""
        if task not in MANAGER.known:
            return await _respond(send, *_task_error(MANAGER.unknown(task)))
        request = {key: value for key, value in request.items() if key != "task"} | {"model": BASE_NAMES[0]}
        body = json.dumps(request).encode()
        await self.app(_with_length(scope, body), _replay(body, receive), send)

    async def _manage(self, receive, send, ref: str, method: str) -> None:
        await _read_body(receive)
        try:
            if method == "POST":
                started = time.perf_counter()
                task = await MANAGER.add(ref)
                payload = {"task": task.name, "version": task.version, "resident": True, "bytes": task.nbytes,
                           "seconds": round(time.perf_counter() - started, 4)}
            else:
                if "@" in ref:
                    raise TaskError(f"DELETE takes a served task's name ({ref.partition('@')[0]}), not a version",
                                    400)
                await MANAGER.remove(ref)
                payload = {"task": ref, "resident": False}
        except TaskError as error:
            return await _respond(send, *_task_error(error))
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
                                 "root": BASE_NAMES[0], "parent": BASE_NAMES[0], "permission": []}
                                for name in sorted(MANAGER.known)]
            body = json.dumps(listing).encode()
        await _respond(send, start.get("status", 500), body)


def _requested_task(scope, request: dict | None) -> str | None:
    """The task a request names by `task` (body), `X-Expert-Task` (header) or `model`; None for the base model.

    Naming two different tasks is refused rather than guessed."""
    named = set()
    if header := dict(scope["headers"]).get(b"x-expert-task", b"").decode("latin-1").strip():
        named.add(header)
    if request is not None:
        if "task" in request:
            if not isinstance(request["task"], str):
                raise TaskError("`task` must be a task name", 400)
            named.add(request["task"])
        if isinstance(request.get("model"), str) and request["model"] in MANAGER.known:
            named.add(request["model"])
    named -= set(BASE_NAMES)
    if len(named) > 1:
        raise TaskError(f"the request names several tasks ({', '.join(sorted(named))}); name one", 400)
    return named.pop() if named else None


def _check_model_exists(scope, request: dict | None) -> None:
    """A `model` that is neither the base, a task, nor a LoRA adapter vLLM serves: a 404 that lists the tasks."""
    model = request.get("model") if request is not None else None
    if isinstance(model, str) and model not in BASE_NAMES and not _known_to_vllm(scope, model):
        raise MANAGER.unknown(model)


def _check_task_request(request: dict) -> None:
    """What a task request cannot ask for: options under which vLLM would drop the task's key but keep its salt
    (beam search builds its own sampling parameters), or run after the task was released (background responses)."""
    if request.get("use_beam_search"):
        raise TaskError("beam search cannot run on a task: vLLM's beam search drops the request's task", 400)
    if request.get("background"):
        raise TaskError("background responses cannot run on a task: the task must stay loaded until the response "
                        "ends", 400)
    salt = request.get("cache_salt")
    if salt is not None and not (isinstance(salt, str) and salt):
        raise TaskError("Parameter 'cache_salt' must be a non-empty string if provided.", 400)


def _as_task_request(request: dict, task: Task) -> dict:
    """The body vLLM sees: the base model, the task's private key, and a cache salt inside the task's namespace."""
    client_args = request.get("vllm_xargs")
    salt = request.get("cache_salt")
    request = {key: value for key, value in request.items() if key != "task"}
    request["model"] = BASE_NAMES[0]
    request["vllm_xargs"] = {**(client_args if isinstance(client_args, dict) else {}), TASK_ARG: task.key}
    request["cache_salt"] = task.cache_salt(salt)
    return request


def _known_to_vllm(scope, model: str) -> bool:
    """A name vLLM itself serves besides the base (a LoRA adapter)."""
    models = getattr(getattr(scope.get("app"), "state", None), "openai_serving_models", None)
    return model in getattr(models, "lora_requests", {})


def _json_object(body: bytes) -> dict | None:
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return request if isinstance(request, dict) else None


async def _read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls see the client's disconnect

    return replay


def _with_length(scope, body: bytes) -> dict:
    headers = [(key, value) for key, value in scope["headers"] if key != b"content-length"]
    return dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])


async def _respond(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _rename_model(task: str, send):
    """Responses name the task, not the base model they ran on (content-length fixed for plain bodies)."""
    old, new = f'"model":"{BASE_NAMES[0]}"'.encode(), f'"model":"{task}"'.encode()
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


async def serve(args: Namespace, tasks: dict[str, Task], max_resident: int, registry, base: str, model,
                api_keys: list[str], public_metrics: bool) -> None:
    """Start the engine with the bank worker, load the initial tasks, then serve HTTP until stopped."""
    global MANAGER, BASE_NAMES, API_KEYS
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve
    from vllm.entrypoints.launchers.launcher import setup_server

    from .engine import start_engine

    BASE_NAMES = tuple(args.served_model_name or [args.model])
    keys = [key for key in (api_keys or [envs.VLLM_API_KEY]) if key]
    API_KEYS = ApiKeys(keys, frozenset({"/health", "/metrics"} if public_metrics else {"/health"}))
    args.middleware = [*args.middleware, f"{__name__}.TaskRouting"]  # outermost: it checks the key first
    listen_address, sock = setup_server(args, reuse_port=False)
    async with start_engine(args) as engine:
        try:
            MANAGER = TaskManager(engine, dict(tasks), max_resident, model, registry, base, BASE_NAMES[0])
            engine.generate = count_tokens(engine.generate, MANAGER.task_of_key)
            bank = await MANAGER.bank()
            if not bank["rows_per_layer"]:
                raise InvalidInputError(f"the expert bank holds no expert: one expert row in every MoE layer takes "
                                        f"{bank['bytes_per_row'] / 2**20:.1f} MiB; give a larger --expert-bank-gb")
            if not await MANAGER.check_layout():
                logger.warning("the base checkpoint has no per-expert tensors to check the bank's weight layout with")
            for name in list(tasks)[:max_resident]:
                await MANAGER.ensure_resident(name)
            shutdown = await build_and_serve(engine, listen_address, sock, args)  # vLLM's app, TLS and all
        finally:
            MANAGER = None  # the engine shuts down with this block: nothing may keep it until interpreter exit
    await shutdown
