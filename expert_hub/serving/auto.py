"""`"model": "auto"` in the server: the front end picks a request's task from its prompt's routing.

The router (`expert_hub.auto_routing`) runs the base model's first `depth` MoE layers with transformers, in the
front-end process beside vLLM: only those layers are loaded (a config cut after the last of them), on the CPU, when
the first request asks for auto routing, and each prompt runs in a worker thread, one at a time, so the event loop
keeps serving while it routes. The candidates are the servable tasks that have a routing profile; a task without
one is never chosen.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from expert_hub.auto_routing import DEFAULT_DEPTH, DEFAULT_THRESHOLD, RouteChoice, RoutingProfile, TaskRouter
from expert_hub.data import prompt_ids
from expert_hub.errors import InvalidInputError
from expert_hub.io import first_line

from .tasks import Task, TaskError

logger = logging.getLogger(__name__)


class AutoRouting:
    """The server's router: the base's first MoE layers, the tokenizer, and the profiles of the servable tasks."""

    def __init__(
        self, base: str, moe_layers: list[int], depth: int = DEFAULT_DEPTH, threshold: float = DEFAULT_THRESHOLD
    ):
        self.base, self.depth, self.threshold = base, min(depth, len(moe_layers)), threshold
        self.layers_needed = moe_layers[self.depth - 1] + 1
        self.router: TaskRouter | None = None  # loaded by the first auto request
        self.tokenizer = None
        self._profiles: dict[Path, RoutingProfile | None] = {}  # by adapter directory: a task's files never change
        self._one_at_a_time = asyncio.Lock()

    def _load(self) -> None:
        from expert_hub.models import load_base, load_tokenizer

        self.tokenizer = load_tokenizer(self.base)
        model = load_base(self.base, layers=self.layers_needed)
        self.router = TaskRouter(model, self.depth, self.threshold)

    def profiles(self, tasks: dict[str, Task]) -> dict[str, RoutingProfile]:
        """The routing profile of each task that has one."""
        for task in tasks.values():
            if task.directory not in self._profiles:
                self._profiles[task.directory] = RoutingProfile.load(task.directory)
        return {name: profile for name, task in tasks.items() if (profile := self._profiles[task.directory])}

    async def choose(self, path: str, request: dict, tasks: dict[str, Task]) -> RouteChoice:
        """Where this completions or chat request should run; bad input is a `TaskError` (400)."""
        profiles = self.profiles(tasks)
        if not profiles:
            raise TaskError("auto routing needs a served task with a routing profile; none has one", 400)
        async with self._one_at_a_time:
            if self.router is None:
                try:
                    await asyncio.to_thread(self._load)
                except Exception as error:  # the server's own model: not the client's fault
                    logger.exception("cannot load the auto router")
                    raise TaskError(f"auto routing is unavailable: {first_line(error)}", 500) from error
            token_ids = self._prompt_ids(path, request)
            try:
                return await asyncio.to_thread(self.router.route, token_ids, profiles)
            except InvalidInputError as error:
                raise TaskError(str(error), 400) from error

    def _prompt_ids(self, path: str, request: dict) -> list[int]:
        """The prompt's token ids as vLLM will see them: a completion's text (or ids), a chat's rendered turns."""
        if path == "/v1/completions":
            prompt = request.get("prompt")
            if prompt == "" or prompt == []:
                raise TaskError("the prompt is empty: there is nothing to route", 400)
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt)
            if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
                return prompt
            raise TaskError("auto routing takes one prompt per request: a string or a list of token ids", 400)
        messages = request.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            raise TaskError("auto routing needs `messages` with text contents", 400)
        chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        return prompt_ids(
            [{"role": m.get("role"), "content": m["content"]} for m in messages], self.tokenizer, chat_template
        )
