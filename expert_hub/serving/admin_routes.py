"""The task admin routes, a FastAPI router included into vLLM's app: `GET /v1/tasks` (every servable task, its
residency, and the bank), `POST /v1/tasks/{ref}` (make a registry task servable and resident) and
`DELETE /v1/tasks/{name}` (unload it); `POST /v1/route/completions` and `/v1/route/chat/completions` (where
`"model": "auto"` would send such a request, without running it).

The API key is checked before these run, by the middleware (`middleware.py`), which leaves their requests alone
otherwise. Answers are JSON as `json.dumps` writes it; refusals are OpenAI-style errors with the `TaskError`'s
status.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request, Response

from .served_tasks import TaskError
from .serving_state import error_body, serving_state

admin_router = APIRouter()


def _json(payload: dict) -> Response:
    return Response(json.dumps(payload).encode(), media_type="application/json")


def _refusal(error: TaskError) -> Response:
    headers = {"retry-after": str(error.retry_after)} if error.retry_after else None
    return Response(error_body(error.status, str(error)), error.status, headers=headers, media_type="application/json")


@admin_router.get("/v1/tasks", include_in_schema=False)
async def list_tasks(request: Request, limit: int = 100, after: str | None = None) -> Response:
    """A page of the servable tasks by name (`limit` of them, 1-1000, after the task named `after`: the previous
    page's `last_id`): each with its residency, requests in flight and waiting, and last load; the bank; and how
    requests have waited for their tasks."""
    if not 1 <= limit <= 1000:
        return _refusal(TaskError(f"limit must be between 1 and 1000, got {limit}", 400))
    manager = serving_state(request.app).manager
    names, more = await manager.page(limit, after)
    residency, now = manager.residency, asyncio.get_running_loop().time()
    assert residency is not None  # `page` waited for the bank's size
    page = [
        {
            "id": name,
            "version": manager.known[name].version,
            "resident": name in residency.resident,
            "in_flight": residency.in_flight[name],
            "waiting": len(residency.waiting.get(name, ())),
            "bytes": manager.known[name].nbytes,
            "load_seconds": manager.load_seconds.get(name),
            "last_load": manager.last_load.get(name),
        }
        for name in names
    ]
    bank = await manager.bank() | {"layout_checked": manager.layout_checked, "task_slots_usable": residency.slots}
    scheduler = {
        "resident": len(residency.resident),
        "waiting": residency.waiting_count(),
        "oldest_wait_seconds": round(residency.oldest_wait(now), 4),
        "longest_wait_seconds": round(manager.longest_wait, 4),
        "timeouts": manager.timeouts,
        "hits": {tier: manager.hits[tier] for tier in ("bank", "memory", "disk")},
    }
    listing: dict[str, object] = {"object": "list", "data": page, "first_id": names[0] if names else None}
    listing |= {"last_id": names[-1] if names else None, "has_more": more, "total": len(manager.known)}
    return _json(listing | {"bank": bank, "scheduler": scheduler})


@admin_router.post("/v1/tasks/{ref:path}", include_in_schema=False)
async def add_task(ref: str, request: Request) -> Response:
    """`ref` = `law`, `law@3` or `law@1f3a`: loading it is timed, so clients see what a task costs."""
    started = time.perf_counter()
    try:
        task = await serving_state(request.app).manager.add(ref)
    except TaskError as error:
        return _refusal(error)
    return _json(
        {
            "task": task.name,
            "version": task.version,
            "resident": True,
            "bytes": task.nbytes,
            "seconds": round(time.perf_counter() - started, 4),
        }
    )


@admin_router.delete("/v1/tasks/{name:path}", include_in_schema=False)
async def remove_task(name: str, request: Request) -> Response:
    if "@" in name:
        return _refusal(TaskError(f"DELETE takes a served task's name ({name.partition('@')[0]}), not a version", 400))
    try:
        await serving_state(request.app).manager.remove(name)
    except TaskError as error:
        return _refusal(error)
    return _json({"task": name, "resident": False})


@admin_router.post("/v1/route/{endpoint:path}", include_in_schema=False)
async def choose_task(endpoint: str, request: Request) -> Response:
    """Where auto routing would run this completions or chat request (`endpoint`: `completions` or
    `chat/completions`, the body as that endpoint takes it): `{"task": NAME or null (the base model), "eligible":
    [...], "confidence": ...}`. Nothing runs and nothing is counted: replicas' ingress (`replicas.py`) asks this of
    one replica, then sends the request to a replica that holds the chosen task."""
    if endpoint not in ("completions", "chat/completions"):
        return _refusal(TaskError(f"auto routing serves completions and chat/completions, not {endpoint}", 400))
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _refusal(TaskError("the request body must be a JSON object", 400))
    state = serving_state(request.app)
    try:
        choice = await state.auto.choose(f"/v1/{endpoint}", body, dict(state.manager.known))
    except TaskError as error:
        return _refusal(error)
    return _json({"task": choice.task, "eligible": list(choice.eligible), "confidence": choice.confidence})
