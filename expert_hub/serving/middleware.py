"""`TaskRouting`, the ASGI middleware around vLLM's handlers: what must happen to a request before and after vLLM
sees it. Outermost in the stack, it
- checks the API key on every route but `/health` (and `/metrics` with `--public-metrics`), in constant time,
  before anything is read, loaded or answered on the caller's behalf; the task admin routes (`admin_routes.py`) are then
  left to the app;
- chooses the task of a request on the generating endpoints (`TASK_ROUTES`): `model` = a task name,
  `{"task": ...}` in the body, or an `X-Expert-Task` header; the request then runs on the base model with the task's
  private key in `vllm_xargs` and its cache salt (see `served_tasks.py`), its task is pinned until the response ends, and
  the response names the task. A task selector on any other endpoint is refused with a 400 naming the endpoint,
  never answered by the base model; the tokenizer endpoints accept one (every task shares the base's tokenizer);
- routes `"model": "auto"` requests (or `X-Expert-Task: auto`) on completions and chat completions to the task whose
  routing profile best matches the prompt's (`auto.py`), or to the base model; the response names what ran, in
  `model` and an `X-Expert-Task-Chosen` header;
- adds every servable task to vLLM's `/v1/models` listing, with the base as parent;
- counts requests per task (token counters: `metrics.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable
from typing import TypeVar

from starlette.routing import Match

from expert_hub.registry import AUTO

from . import vllm_contract as vllm
from .admin_routes import admin_router
from .asgi import is_preflight, json_object, path_of, read_body, replay, respond, with_length
from .bank import TASK_ARG
from .metrics import AUTO_ROUTED_REQUESTS, TASK_REQUESTS
from .served_tasks import Task, TaskError
from .serving_state import ServingState, error_body, serving_state

# Endpoints whose requests carry `model`, `vllm_xargs` and `cache_salt` at the top level and generate: a task runs here.
TASK_ROUTES = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/chat/completions/batch",
        "/v1/responses",
        "/v1/messages",
        "/invocations",
    }
)
AUTO_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})  # where a request can ask for auto routing
# Endpoints that only use the tokenizer, which every task shares: a task name is checked, the base answers.
TOKENIZER_ROUTES = frozenset({"/tokenize", "/detokenize", "/v1/messages/count_tokens"})


class TaskRouting:
    """Pure ASGI middleware: checks the key, resolves a request's task, pins it, rewrites the body for vLLM."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or (scope["type"] == "http" and is_preflight(scope)):
            return await self.app(scope, receive, send)
        state = serving_state(scope["app"])  # held until the request ends, even if the server shuts down meanwhile
        if not state.api_keys.allow(scope, path_of(scope)):
            return await _refuse_unauthenticated(scope, send)
        if scope["type"] == "websocket" or _is_admin_request(scope):
            return await self.app(scope, receive, send)
        if path_of(scope) == "/v1/models" and scope["method"] == "GET":
            return await self._list_models(state, scope, receive, send)
        body = await read_body(receive)
        await self._dispatch(state, scope, replay(body, receive), send, json_object(body))

    async def _dispatch(self, state: ServingState, scope, receive, send, request: dict | None) -> None:
        """Send a read request to vLLM as its task, as the base model, or refuse it."""
        path = path_of(scope)
        try:
            task = _requested_task(state, scope, request)
            if task is None and (path in TASK_ROUTES or path in TOKENIZER_ROUTES):
                _check_model_exists(state, scope, request)
        except TaskError as error:
            return await _refuse(send, error)
        if task == AUTO:
            return await self._run_auto(state, scope, receive, send, request)
        if path in TASK_ROUTES and scope["method"] == "POST" and request is not None:
            if task is None:
                TASK_REQUESTS.labels(task="base").inc()
                return await self.app(scope, receive, send)
            return await self._run_as_task(state, scope, receive, send, request, task)
        if task is not None and path in TOKENIZER_ROUTES and request is not None:
            return await self._tokenize_for_task(state, scope, receive, send, request, task)
        if task is not None:
            return await respond(
                send,
                400,
                error_body(400, f"{path} does not serve tasks: send task requests to {', '.join(sorted(TASK_ROUTES))}"),
            )
        await self.app(scope, receive, send)

    async def _run_as_task(self, state: ServingState, scope, receive, send, request: dict, task: str) -> None:
        """Run a generating request on its task's experts, the task pinned until the response ends."""
        try:
            _check_task_request(request)
            served = await _unless_disconnected(state, state.manager.acquire(task), receive)
        except TaskError as error:
            return await _refuse(send, error)
        except ClientGone:
            return
        await self._run_pinned(state, scope, receive, send, request, served)

    async def _run_pinned(
        self, state: ServingState, scope, receive, send, request: dict, task: Task, headers: tuple = ()
    ) -> None:
        """Run a request on a task that `acquire` pinned for it, and release the task when the response ends."""
        try:
            TASK_REQUESTS.labels(task=task.name).inc()
            body = json.dumps(_as_task_request(state, request, task)).encode()
            renaming = _rename_model(state, task.name, send, headers)
            await self.app(with_length(scope, body), replay(body, receive), renaming)
        finally:
            state.manager.release(task.name)

    async def _run_auto(self, state: ServingState, scope, receive, send, request: dict | None) -> None:
        """Route a request by its prompt's routing, then run it as the chosen task or as the base model.

        A task removed between routing and running (a DELETE racing the request) gives way to the next eligible
        task, or to the base model: the client never named it, so it never hears of it, and the response and the
        counters name what actually ran."""
        path = path_of(scope)
        if path not in AUTO_ROUTES or scope["method"] != "POST":
            message = f"auto routing serves POST {' and '.join(sorted(AUTO_ROUTES))}, not {scope['method']} {path}"
            return await respond(send, 400, error_body(400, message))
        if request is None:
            return await respond(send, 400, error_body(400, "the request body must be a JSON object"))
        request = {key: value for key, value in request.items() if key != "task"}
        try:
            choice = await state.auto.choose(path, request, dict(state.manager.known))
            if choice.task is not None:
                _check_task_request(request)
            served = await _unless_disconnected(state, _acquire_first(state, choice.eligible), receive)
        except TaskError as error:
            return await _refuse(send, error)
        except ClientGone:
            return
        ran = served.name if served else state.base_name
        AUTO_ROUTED_REQUESTS.labels(task=served.name if served else "base").inc()
        headers = ((b"x-expert-task-chosen", ran.encode()),)
        if served is not None:
            return await self._run_pinned(state, scope, receive, send, request, served, headers)
        TASK_REQUESTS.labels(task="base").inc()
        body = json.dumps(request | {"model": state.base_name}).encode()
        renaming = _rename_model(state, state.base_name, send, headers)
        await self.app(with_length(scope, body), replay(body, receive), renaming)

    async def _tokenize_for_task(self, state: ServingState, scope, receive, send, request: dict, task: str) -> None:
        """Every task shares the base model's tokenizer: the task only has to exist."""
        if task not in state.manager.known:
            return await _refuse(send, state.manager.unknown(task))
        request = {key: value for key, value in request.items() if key != "task"} | {"model": state.base_name}
        body = json.dumps(request).encode()
        await self.app(with_length(scope, body), replay(body, receive), send)

    async def _list_models(self, state: ServingState, scope, receive, send) -> None:
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
            listing["data"] += [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "expert-hub",
                    "root": state.base_name,
                    "parent": state.base_name,
                    "permission": [],
                }
                for name in sorted(state.manager.known)
            ]
            body = json.dumps(listing).encode()
        await respond(send, start.get("status", 500), body)


def _is_admin_request(scope) -> bool:
    """A request one of the task admin routes serves (method and path)."""
    return any(route.matches(scope)[0] is Match.FULL for route in admin_router.routes)


async def _refuse_unauthenticated(scope, send) -> None:
    if scope["type"] == "websocket":
        return await send({"type": "websocket.close", "code": 1008})
    await respond(
        send,
        401,
        error_body(401, "Unauthorized: give the API key as 'Authorization: Bearer KEY'"),
        [(b"www-authenticate", b"Bearer")],
    )


def _requested_task(state: ServingState, scope, request: dict | None) -> str | None:
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
        model = request.get("model")
        if model == AUTO or (
            isinstance(model, str) and (model in state.manager.known or state.manager.source.pullable(model))
        ):
            named.add(request["model"])
    named -= set(state.base_names)
    if len(named) > 1:
        raise TaskError(f"the request names several tasks ({', '.join(sorted(named))}); name one", 400)
    return named.pop() if named else None


def _check_model_exists(state: ServingState, scope, request: dict | None) -> None:
    """A `model` that is neither the base, a task, nor a LoRA adapter vLLM serves: a 404 that lists the tasks."""
    model = request.get("model") if request is not None else None
    if isinstance(model, str) and model not in state.base_names and model not in vllm.lora_adapter_names(scope["app"]):
        raise state.manager.unknown(model)


async def _acquire_first(state: ServingState, names: tuple[str, ...]) -> Task | None:
    """The first of `names` that is still servable, pinned for one request; None when none is (the base model)."""
    for name in names:
        try:
            return await state.manager.acquire(name)
        except TaskError as error:
            if error.status != 404:  # it exists but cannot run now: say so rather than run another task
                raise
    return None


class ClientGone(Exception):
    """The client disconnected while its request waited for its task."""


_Pinned = TypeVar("_Pinned", Task, Task | None)  # a task `acquire` pinned, or None for the base model


async def _unless_disconnected(state: ServingState, acquiring: Awaitable[_Pinned], receive) -> _Pinned:
    """`acquiring` (which may wait for a task to be loaded), given up at once if the client disconnects meanwhile
    (the manager then drops its place in the queue, or its pin): `ClientGone` then. A request cancelled itself (the
    server stopping) gives up its place, or the pin it was granted just before.

    The request's body was read already; `receive` now only reports the disconnect (the app gets the body again
    from a replay of its own)."""
    acquire = asyncio.ensure_future(acquiring)
    disconnect = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({acquire, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        if not acquire.done():
            acquire.cancel()
        elif not acquire.cancelled() and acquire.exception() is None and (pinned := acquire.result()) is not None:
            state.manager.release(pinned.name)
        raise
    finally:
        disconnect.cancel()
    if acquire.done():
        return acquire.result()
    acquire.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await acquire
    raise ClientGone


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _check_task_request(request: dict) -> None:
    """What a task request cannot ask for: options under which vLLM would drop the task's key but keep its salt
    (beam search builds its own sampling parameters), or run after the task was released (background responses)."""
    if request.get("use_beam_search"):
        raise TaskError("beam search cannot run on a task: vLLM's beam search drops the request's task", 400)
    if request.get("background"):
        raise TaskError(
            "background responses cannot run on a task: the task must stay loaded until the response ends", 400
        )
    salt = request.get("cache_salt")
    if salt is not None and not (isinstance(salt, str) and salt):
        raise TaskError("Parameter 'cache_salt' must be a non-empty string if provided.", 400)


def _as_task_request(state: ServingState, request: dict, task: Task) -> dict:
    """The body vLLM sees: the base model, the task's private key, and a cache salt inside the task's namespace."""
    client_args = request.get("vllm_xargs")
    salt = request.get("cache_salt")
    request = {key: value for key, value in request.items() if key != "task"}
    request["model"] = state.base_name
    request["vllm_xargs"] = {**(client_args if isinstance(client_args, dict) else {}), TASK_ARG: task.key}
    request["cache_salt"] = task.cache_salt(salt)
    return request


async def _refuse(send, error: TaskError) -> None:
    """An OpenAI-style error, with `Retry-After` when the error says when to retry."""
    headers = [(b"retry-after", str(error.retry_after).encode())] if error.retry_after else []
    await respond(send, error.status, error_body(error.status, str(error)), headers)


def _rename_model(state: ServingState, task: str, send, extra_headers: tuple = ()):
    """Responses name the task, not the base model they ran on (content-length fixed for plain bodies), with
    `extra_headers`. A byte replacement, not a parse: vLLM writes each body, and each streamed event, as one chunk
    of compact JSON, and generated text inside it is JSON-escaped, so `"model":"BASE"` appears only as the field."""
    old, new = f'"model":"{state.base_name}"'.encode(), f'"model":"{task}"'.encode()
    held = {}

    async def renaming(message):
        if message["type"] == "http.response.start":
            held.update(message)
            return
        if message["type"] == "http.response.body":
            chunk = message.get("body", b"").replace(old, new)
            if held:
                headers = [(k, v) for k, v in held["headers"] if k != b"content-length"] + list(extra_headers)
                if not message.get("more_body", False):
                    headers.append((b"content-length", str(len(chunk)).encode()))
                await send({**held, "headers": headers})
                held.clear()
            return await send({**message, "body": chunk})
        return await send(message)

    return renaming
