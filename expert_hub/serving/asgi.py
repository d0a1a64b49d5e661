"""Raw ASGI plumbing the middleware needs: a request's path, its whole body read (and handed on again as if
unread), and a JSON response sent without a framework."""

from __future__ import annotations

import json


def path_of(scope) -> str:
    return scope["path"].removeprefix(scope.get("root_path", ""))


def is_preflight(scope) -> bool:
    """A CORS preflight (answered by vLLM's CORS middleware, which runs nothing): browsers send it without a key."""
    return scope["method"] == "OPTIONS" and any(
        name == b"access-control-request-method" for name, _ in scope["headers"]
    )


def json_object(body: bytes) -> dict | None:
    """A request body's JSON object; None for anything else (not JSON, nested deeper than Python parses, a list)."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return request if isinstance(request, dict) else None


async def read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay(body: bytes, receive):
    """A `receive` that gives the body already read, then what the client sends next."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls see the client's disconnect

    return replayed


def with_length(scope, body: bytes) -> dict:
    """The request's scope with the content-length of a rewritten body."""
    headers = [(key, value) for key, value in scope["headers"] if key != b"content-length"]
    return dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])


async def respond(send, status: int, body: bytes, headers: list | None = None) -> None:
    """A whole JSON response."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
