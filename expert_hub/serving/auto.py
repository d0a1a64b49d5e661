"""`"model": "auto"` in the server: the front end picks a request's task from its prompt's routing.

The router (`expert_hub.auto_routing`) runs the base model's first `depth` MoE layers with transformers, in the
front-end process beside vLLM: only those layers are loaded (a config cut after the last of them), on the CPU, when
the first request asks for auto routing. Prompts are routed together, in one padded forward pass on the router's own
thread, so the event loop keeps serving: a pass waits while prompts keep arriving (until none has for `QUIET_S`, at
most `GATHER_S` after the oldest arrived), so a burst of requests costs one pass rather than one for its first request
and another for the rest; prompts that arrive during a pass go in the next. A lone prompt waits `QUIET_S`. The
candidates are the servable tasks that have a routing profile; a task without one is never chosen.

With a CPU engine the router runs as the engine does. On one torch thread: vLLM pins its workers to every core but the
ones it keeps for its scheduler, which this front end shares, and more router threads contend for a worker's core (on
asyncio's shared pool, whichever thread ran a pass brought torch helper threads of its own to that contest; figures in
benchmarks/results/auto_routing.md, History). torch's thread count is partly process-wide: front-end threads that
first use torch after the router starts get one thread too. In the served dtype (bfloat16 for a float32 checkpoint): `bench_auto_routing.py` measures its
choices against float32's and its pass time.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from expert_hub.auto_routing import (
    DEFAULT_DEPTH,
    DEFAULT_THRESHOLD,
    RouteChoice,
    RoutingProfile,
    TaskRouter,
    check_prompt_text,
    completion_routing_ids,
)
from expert_hub.data import prompt_ids
from expert_hub.errors import InvalidInputError
from expert_hub.io import first_line

from .served_tasks import Task, TaskError

logger = logging.getLogger(__name__)

QUIET_S = 0.003  # a burst's requests reach the router up to 3 ms apart on 2 cores
GATHER_S = 0.015  # the longest a prompt waits for others before its pass starts


class _Waiting(NamedTuple):
    token_ids: list[int]
    chosen: asyncio.Future  # the request's answer
    arrived: float  # event-loop time


class AutoRouting:
    """The server's router: the base's first MoE layers, the tokenizer, and the profiles of the servable tasks."""

    def __init__(
        self,
        base: str,
        moe_layers: list[int],
        depth: int = DEFAULT_DEPTH,
        threshold: float = DEFAULT_THRESHOLD,
        threads: int | None = None,
        dtype: torch.dtype | None = None,
        chat_template: str | None = None,
    ):
        self.base, self.depth, self.threshold = base, min(depth, len(moe_layers)), threshold
        self.dtype = dtype  # None: the checkpoint's
        self.chat_template = chat_template  # the server's `--chat-template`, None: the tokenizer's own
        # one thread loads the router and runs every pass: a thread that has run torch keeps its own thread count,
        # and each such thread keeps its own pool of torch helper threads
        self._executor = ThreadPoolExecutor(
            1, "auto-router", initializer=(lambda: torch.set_num_threads(threads)) if threads else None
        )
        self.layers_needed = moe_layers[self.depth - 1] + 1
        self.router: TaskRouter | None = None  # loaded by the first auto request
        self.tokenizer: Any = None  # transformers' tokenizer, loaded with the router
        self._loading: asyncio.Future | None = None  # the router's load, shared by the requests waiting for it
        self._waiting: list[_Waiting] = []  # prompts for the next routing pass
        self._candidates: dict[str, RoutingProfile] = {}  # the newest request's: tasks come and go at run time
        self._pass: asyncio.Task | None = None

    def _load(self) -> None:
        from expert_hub.models import load_base, load_tokenizer

        self.tokenizer = load_tokenizer(self.base)
        if self.chat_template:  # chats are routed as vLLM renders them
            self.tokenizer.chat_template = self.chat_template
        model = load_base(self.base, layers=self.layers_needed, dtype=self.dtype)
        self.router = TaskRouter(model, self.depth, self.threshold)

    async def choose(self, path: str, request: dict, tasks: dict[str, Task]) -> RouteChoice:
        """Where this completions or chat request should run; bad input is a `TaskError` (400)."""
        profiles = {name: task.profile for name, task in tasks.items() if task.profile is not None}
        if not profiles:
            raise TaskError("auto routing needs a served task with a routing profile; none has one", 400)
        if self.router is None:
            await self._loaded()
        try:
            token_ids = self._prompt_ids(path, request)
        except InvalidInputError as error:
            raise TaskError(str(error), 400) from error
        loop = asyncio.get_running_loop()
        chosen = loop.create_future()
        self._waiting.append(_Waiting(token_ids, chosen, loop.time()))
        self._candidates = profiles
        if self._pass is None or self._pass.done():
            self._pass = asyncio.create_task(self._route_waiting())
        return await chosen

    async def _loaded(self) -> None:
        """Wait for the router, loading it once for every request that waits: a client that leaves mid-load neither
        stops the load nor makes the next request start another. A failed load is tried again by the next one."""
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._in_thread(self._load))
            self._loading.add_done_callback(self._forget_failed_load)
        try:
            await asyncio.shield(self._loading)
        except Exception as error:  # the server's own model: not the client's fault
            raise TaskError(f"auto routing is unavailable: {first_line(error)}", 500) from error

    def _forget_failed_load(self, loading: asyncio.Future) -> None:
        """Log a failed load once, and let the next request try again (even when no request waited for this one)."""
        if loading.cancelled() or loading.exception() is not None:
            self._loading = None
            if not loading.cancelled():
                logger.error("cannot load the auto router", exc_info=loading.exception())

    async def _route_waiting(self) -> None:
        """Route every waiting prompt, a pass at a time, until none waits."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            seen, deadline = 0, self._waiting[0].arrived + GATHER_S
            while len(self._waiting) != seen and (left := deadline - loop.time()) > 0:
                seen = len(self._waiting)
                await asyncio.sleep(min(QUIET_S, left))
            batch = [waiting for waiting in self._waiting if not waiting.chosen.done()]  # a client may have gone
            self._waiting = []
            if not batch:
                continue
            try:
                assert self.router is not None  # each waiting request's `choose` loaded it first
                choices = await self._in_thread(
                    self.router.route_many, [waiting.token_ids for waiting in batch], self._candidates
                )
            except Exception as error:  # a profile that does not fit the model: the server's own files
                logger.exception("auto routing failed")
                for waiting in batch:
                    if not waiting.chosen.done():
                        waiting.chosen.set_exception(TaskError(f"auto routing failed: {first_line(error)}", 500))
                continue
            for waiting, choice in zip(batch, choices):
                if not waiting.chosen.done():
                    waiting.chosen.set_result(choice)

    async def _in_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _prompt_ids(self, path: str, request: dict) -> list[int]:
        """The prompt's token ids as vLLM will see them: a completion's text (or ids), a chat's rendered turns."""
        if path == "/v1/completions":
            prompt = request.get("prompt")
            if prompt == "" or prompt == []:
                raise TaskError("the prompt is empty: there is nothing to route", 400)
            if isinstance(prompt, str):
                return completion_routing_ids(prompt, self.tokenizer)
            if isinstance(prompt, list) and all(type(token) is int for token in prompt):  # a bool is no token id
                if not all(0 <= token < len(self.tokenizer) for token in prompt):
                    raise TaskError("the prompt holds token ids outside the vocabulary", 400)
                return prompt
            raise TaskError("auto routing takes one prompt per request: a string or a list of token ids", 400)
        messages = request.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            raise TaskError("auto routing needs `messages` with text contents", 400)
        check_prompt_text("".join(m["content"] for m in messages))
        chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        return prompt_ids(
            [{"role": m.get("role"), "content": m["content"]} for m in messages], self.tokenizer, chat_template
        )
