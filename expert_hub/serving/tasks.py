"""The front end's view of tasks: which can be served, which are resident in the bank, and who is using them.

A task is resident when its experts sit in bank rows. Loading asks the worker over `collective_rpc`; when the
bank is full (or `max_resident` is reached) the least recently used idle task is evicted, and reloaded on demand.
Requests in flight pin their task: it is never evicted or unloaded under them.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from expert_hub.adapter import AdapterHeader
from expert_hub.errors import ExpertHubError, InvalidInputError, UnsupportedModelError

from .worker import BANK_FULL

LOAD = "expert_hub_load_task"
UNLOAD = "expert_hub_unload_task"
BANK_INFO = "expert_hub_bank_info"
CHECK_LAYOUT = "expert_hub_check_layout"


class TaskError(ExpertHubError):
    """A task request that cannot be met; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class Task:
    name: str
    directory: Path  # a verified registry object or an adapter directory
    nbytes: int
    experts_per_layer: dict[int, int]  # layer index -> how many of its experts the task replaces


def cache_salt(task: str) -> str:
    """A prefix-cache salt per task: its hidden states differ, so its KV blocks must never be shared."""
    return "expert-hub-" + hashlib.sha256(task.encode()).hexdigest()[:32]


def adapter_task(name: str, directory: Path) -> Task:
    """A servable task from an adapter directory; tasks that trained more than routed experts are refused."""
    header = AdapterHeader.read(directory)
    if header.selection.shared_experts or header.selection.non_expert_modules:
        raise InvalidInputError(
            f"task {name} also trained shared experts or non-expert modules, which every request shares: "
            "it cannot join mixed batches; serve its merged checkpoint as a separate model instead"
        )
    nbytes = sum(path.stat().st_size for path in set(header.shards.values()))
    counts = {layer: len(experts) for layer, experts in header.selection.experts.items()}
    return Task(name, Path(directory), nbytes, counts)


def _worker_message(error: Exception) -> str:
    """The worker's own message from vLLM's wrapping ("... Worker failed with error '<message>', please check ...")."""
    found = re.search(r"failed with error '(.*)'", str(error), re.DOTALL)
    return found.group(1) if found else str(error)


class TaskManager:
    def __init__(self, engine, known: dict[str, Task], max_resident: int, registry=None, base: str | None = None):
        self.engine = engine
        self.known = known  # servable tasks by name
        self.max_resident = max_resident
        self.registry, self.base = registry, base
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> remap row, least recently used first
        self.in_flight: dict[str, int] = {}
        self.load_seconds: dict[str, float] = {}
        self.rows_per_layer: int | None = None  # the bank's size, once known
        self.layout_checked = False
        self._lock = asyncio.Lock()

    async def acquire(self, name: str) -> None:
        """Make `name` resident (loading it if needed) and pin it for one request."""
        if name not in self.known:
            raise TaskError(f"The model `{name}` does not exist.", 404)
        self.in_flight[name] = self.in_flight.get(name, 0) + 1
        try:
            await self.ensure_resident(name)
        except BaseException:
            self.release(name)
            raise

    def release(self, name: str) -> None:
        self.in_flight[name] -= 1

    async def ensure_resident(self, name: str) -> None:
        async with self._lock:
            if name in self.resident:
                self.resident.move_to_end(name)
                return
            self._check_fits(name)
            while True:
                if len(self.resident) >= self.max_resident:
                    await self._evict_one(name)
                    continue
                try:
                    loop = asyncio.get_running_loop()
                    started = loop.time()
                    rows = await self.engine.collective_rpc(LOAD, args=(name, str(self.known[name].directory)))
                    self.load_seconds[name] = loop.time() - started
                    self.resident[name] = rows[0]
                    return
                except Exception as error:  # the worker's BankFullError arrives as a plain exception
                    if not _worker_message(error).startswith(BANK_FULL) or not self._idle_resident(name):
                        raise TaskError(f"cannot load task {name}: {_worker_message(error)}", 503) from None
                    await self._evict_one(name)

    async def add(self, name: str) -> Task:
        """Make a registry task servable and resident (POST /v1/tasks/{name})."""
        if name not in self.known:
            if self.registry is None:
                raise TaskError(f"task {name} is not servable", 404)
            try:
                entry = self.registry.resolve(name, self.base)
                self.known[name] = adapter_task(name, self.registry.verify(entry))
            except InvalidInputError as error:
                raise TaskError(str(error), 404) from None
        await self.ensure_resident(name)
        return self.known[name]

    async def remove(self, name: str) -> None:
        """Unload a task (DELETE /v1/tasks/{name}); refused while it has requests in flight."""
        async with self._lock:
            if name not in self.known:
                raise TaskError(f"The model `{name}` does not exist.", 404)
            if self.in_flight.get(name):
                raise TaskError(f"task {name} has {self.in_flight[name]} requests in flight; retry when they end", 409)
            if name in self.resident:
                await self.engine.collective_rpc(UNLOAD, args=(name,))
                del self.resident[name]
            del self.known[name]

    async def bank(self) -> dict:
        """The expert bank as the worker sees it: rows per layer, free rows, bytes."""
        info = (await self.engine.collective_rpc(BANK_INFO))[0]
        self.rows_per_layer = info["rows_per_layer"]
        return info

    async def check_layout(self) -> bool:
        """The worker's start-up check that task experts land in the kernel's layout (see `worker.py`)."""
        try:
            self.layout_checked = (await self.engine.collective_rpc(CHECK_LAYOUT))[0]
        except Exception as error:  # the worker's RuntimeError arrives as a plain exception
            raise UnsupportedModelError(_worker_message(error)) from None
        return self.layout_checked

    async def describe(self) -> dict:
        """Every servable task with its residency, requests in flight and last load time; and the bank."""
        tasks = [{"id": name, "resident": name in self.resident, "in_flight": self.in_flight.get(name, 0),
                  "bytes": task.nbytes, "load_seconds": self.load_seconds.get(name)}
                 for name, task in sorted(self.known.items())]
        return {"object": "list", "data": tasks, "bank": await self.bank() | {"layout_checked": self.layout_checked}}

    def _check_fits(self, name: str) -> None:
        """A task with more experts in some layer than the whole bank holds never loads: say so before evicting."""
        layer, largest = max(self.known[name].experts_per_layer.items(), key=lambda item: item[1], default=(None, 0))
        if self.rows_per_layer is not None and largest > self.rows_per_layer:
            raise TaskError(f"task {name} has {largest} experts in layer {layer} and the expert bank holds "
                            f"{self.rows_per_layer} per layer: restart with a larger --expert-bank-rows or "
                            "--expert-bank-gb", 507)

    def _idle_resident(self, keep: str) -> list[str]:
        return [name for name in self.resident if name != keep and not self.in_flight.get(name)]

    async def _evict_one(self, keep: str) -> None:
        idle = self._idle_resident(keep)
        if not idle:
            raise TaskError(f"cannot load task {keep}: every resident task has requests in flight", 503)
        await self.engine.collective_rpc(UNLOAD, args=(idle[0],))
        del self.resident[idle[0]]
