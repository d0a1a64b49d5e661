"""The task admin routes, a FastAPI router included into vLLM's app: `GET /v1/tasks` (every servable task, its
residency, and the bank), `POST /v1/tasks/{ref}` (make a registry task servable and resident) and
`DELETE /v1/tasks/{name}` (unload it).

The API key is checked before these run, by the middleware (`middleware.py`), which leaves their requests alone
otherwise. Answers are JSON as `json.dumps` writes it; refusals are OpenAI-style errors with the `TaskError`'s
status.
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request, Response

from .serving_state import error_body, serving_state
from .tasks import TaskError

admin_router = APIRouter()


def _json(payload: dict) -> Response:
    return Response(json.dumps(payload).encode(), media_type="application/json")


def _refusal(error: TaskError) -> Response:
    return Response(error_body(error.status, str(error)), status_code=error.status, media_type="application/json")


@admin_router.get("/v1/tasks", include_in_schema=False)
async def list_tasks(request: Request) -> Response:
    return _json(await serving_state(request.app).manager.describe())


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
