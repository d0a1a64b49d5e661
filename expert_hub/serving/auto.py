"""`"model": "auto"` in the server: the front end picks a request's task from its prompt's routing.

The router (`expert_hub.auto_routing`) runs the base model's first `depth` MoE layers with transformers, in the
front-end process beside vLLM: only those layers are loaded (a config cut after the last of them), on the CPU, when
the first request asks for auto routing. Prompts are routed together, in one padded forward pass in a worker thread,
so the event loop keeps serving: a pass starts once prompts stop arriving for a moment (`QUIET_S`, at most `GATHER_S`
after the first), so a burst of requests costs one pass rather than a pass for its first request and one for the
rest, and prompts that arrive during a pass wait for the next. The candidates are the servable tasks that have a
routing profile; a task without one is never chosen.

With a CPU engine the router runs as the engine does. On one thread: vLLM binds its workers to every core but those
it keeps for its scheduler and this front end, and a second router thread lands on a worker's core (on 2 cores a
one-prompt pass took 18 ms on two threads, 7 ms on one). In the engine's dtype: on the demo base, bfloat16 routes
24 prompts in 26 ms against float32's 38 ms, with the same choices on the benchmark's held-out prompts.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from expert_hub.auto_routing import DEFAULT_DEPTH, DEFAULT_THRESHOLD, RouteChoice, RoutingProfile, TaskRouter
from expert_hub.data import prompt_ids
from expert_hub.io import first_line

from .tasks import Task, TaskError

logger = logging.getLogger(__name__)

QUIET_S = 0.003  # a burst's requests reach the router up to 3 ms apart on 2 cores
GATHER_S = 0.015  # the longest a prompt waits for others before its pass starts


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
    ):
        self.base, self.depth, self.threshold = base, min(depth, len(moe_layers)), threshold
        self.dtype = dtype  # None: the checkpoint's
        # one thread runs every pass: a torch thread count applies to the thread that sets it, and each thread that
        # runs torch ops keeps its own pool of helper threads
        self._thread = ThreadPoolExecutor(
            1,
            "auto-router",
            initializer=torch.set_num_threads if threads else None,
            initargs=(threads,) if threads else (),
        )
        self.layers_needed = moe_layers[self.depth - 1] + 1
        self.router: TaskRouter | None = None  # loaded by the first auto request
        self.tokenizer = None
        self._profiles: dict[Path, RoutingProfile | None] = {}  # by adapter directory: a task's files never change
        self._loading = asyncio.Lock()
        self._waiting: list[tuple[list[int], asyncio.Future]] = []  # prompts for the next routing pass
        self._candidates: dict[str, RoutingProfile] = {}  # the newest request's: tasks come and go at run time
        self._pass: asyncio.Task | None = None

    def _load(self) -> None:
        from expert_hub.models import load_base, load_tokenizer

        self.tokenizer = load_tokenizer(self.base)
        model = load_base(self.base, layers=self.layers_needed, dtype=self.dtype)
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
        async with self._loading:
            if self.router is None:
                try:
                    await self._in_thread(self._load)
                except Exception as error:  # the server's own model: not the client's fault
                    logger.exception("cannot load the auto router")
                    raise TaskError(f"auto routing is unavailable: {first_line(error)}", 500) from error
        token_ids = self._prompt_ids(path, request)
        chosen = asyncio.get_running_loop().create_future()
        self._waiting.append((token_ids, chosen))
        self._candidates = profiles
        if self._pass is None or self._pass.done():
            self._pass = asyncio.create_task(self._route_waiting())
        return await chosen

    async def _route_waiting(self) -> None:
        """Route every waiting prompt, a pass at a time, until none waits."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            deadline, seen = loop.time() + GATHER_S, 0
            while len(self._waiting) != seen and loop.time() < deadline:
                seen = len(self._waiting)
                await asyncio.sleep(QUIET_S)
            batch, self._waiting = self._waiting, []
            try:
                choices = await self._in_thread(self.router.route_many, [ids for ids, _ in batch], self._candidates)
            except Exception as error:  # a profile that does not fit the model: the server's own files
                logger.exception("auto routing failed")
                for _, chosen in batch:
                    if not chosen.done():  # its client may have gone
                        chosen.set_exception(TaskError(f"auto routing failed: {first_line(error)}", 500))
                continue
            for (_, chosen), choice in zip(batch, choices):
                if not chosen.done():
                    chosen.set_result(choice)

    async def _in_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    def _prompt_ids(self, path: str, request: dict) -> list[int]:
        """The prompt's token ids as vLLM will see them: a completion's text (or ids), a chat's rendered turns."""
        if path == "/v1/completions":
            prompt = request.get("prompt")
            if prompt == "" or prompt == []:
                raise TaskError("the prompt is empty: there is nothing to route", 400)
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt)
            if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
                if not all(0 <= token < len(self.tokenizer) for token in prompt):
                    raise TaskError("the prompt holds token ids outside the vocabulary", 400)
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
