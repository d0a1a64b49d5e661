"""What the HTTP side of `expert-hub serve` shares: the serving state kept on vLLM's app, the API keys, and the
OpenAI-style error body that both the middleware (`middleware.py`) and the task routes (`admin_routes.py`) answer with.

The state lives on the app (`app.state.expert_hub`), which a route reaches as `request.app` and the middleware as
`scope["app"]`: no module globals, and a request holds the state it started with until it ends.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from .auto import AutoRouting
from .manager import TaskManager

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    507: "InsufficientStorageError",
}


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


@dataclass(frozen=True)
class ServingState:
    manager: TaskManager
    base_names: tuple[str, ...]  # the served model's names; the first is the one vLLM answers with
    api_keys: ApiKeys
    auto: AutoRouting  # `"model": "auto"`

    @property
    def base_name(self) -> str:
        return self.base_names[0]

    def install(self, app) -> None:
        app.state.expert_hub = self


def serving_state(app) -> ServingState:
    """The state `serve` stored on vLLM's app."""
    return app.state.expert_hub


def error_body(status: int, message: str) -> bytes:
    """An OpenAI-style error body, typed as vLLM types its own."""
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "APIError"), "param": None, "code": status}}
    return json.dumps(body).encode()
