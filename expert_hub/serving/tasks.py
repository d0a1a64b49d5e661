"""The front end's view of tasks: which can be served, which are resident in the bank, and who is using them.

A task is resident when its experts sit in bank rows. Loading asks the worker through `BankClient`, whose result
says whether the task loaded, the bank was full or the adapter was refused; when the bank is full (or
`max_resident` is reached) the least recently used idle task is evicted, and reloaded on demand.
Requests in flight pin their task: it is never evicted or unloaded under them.

Each servable task has a private key, random and never sent to clients: the worker tags a request's tokens with a
task only when the request carries that key (`bank.TASK_ARG`), and the task's prefix-cache salt is derived from it.
Clients therefore can neither run a task's experts without naming the task nor reach its KV blocks. A task added
again after a DELETE gets a new key, so blocks cached for an earlier version are never reused.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from expert_hub.adapter import AdapterHeader
from expert_hub.auto_routing import RoutingProfile
from expert_hub.errors import ExpertHubError, InvalidInputError, UnsupportedModelError
from expert_hub.models import ModelSummary
from expert_hub.registry import AUTO, RegistryDamagedError, RegistryError

from . import vllm_contract as vllm
from .bank_client import BankClient
from .worker import BankInfo, LoadResult

logger = logging.getLogger(__name__)


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
    version: int | None = None  # the registry version, None for an adapter directory
    sha256: dict[str, str] | None = None  # a registry task's recorded file hashes, checked at every load
    profile: RoutingProfile | None = None  # how the base routes its prompts: a candidate for auto routing
    key: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)

    def cache_salt(self, client_salt: str | None = None) -> str:
        """The task's prefix-cache namespace: unforgeable, and a client's own salt only ever splits it further."""
        material = self.key if client_salt is None else f"{self.key}\0{client_salt}"
        return "expert-hub-" + hashlib.sha256(material.encode()).hexdigest()[:32]


def adapter_task(
    name: str, directory: Path, model: ModelSummary, version: int | None = None, sha256: dict[str, str] | None = None
) -> Task:
    """A servable task from an adapter directory, checked against the served model before anything is loaded.

    Refused: tasks that trained more than routed experts, experts or shapes the model does not have, and a routing
    profile that is not one of the model's. The weights of an adapter directory are read now, to refuse any that are
    not finite floats; a registry task's (`sha256` given) are hashed and checked by the worker at every load, from
    the bytes it loads, so adding one at run time reads each byte once.
    """
    header = AdapterHeader.read(directory)
    if header.selection.shared_experts or header.selection.non_expert_modules:
        raise InvalidInputError(
            f"task {name} also trained shared experts or non-expert modules, which every request shares: "
            "it cannot join mixed batches; serve its merged checkpoint as a separate model instead"
        )
    header.check_fits(model)
    if sha256 is None:
        header.check_values()
    if (profile := RoutingProfile.load(directory)) is not None:
        profile.check_fits(model.moe_layers, model.num_experts)
    nbytes = sum(path.stat().st_size for path in set(header.shards.values()))
    counts = {layer: len(experts) for layer, experts in header.selection.experts.items()}
    return Task(name, Path(directory), nbytes, counts, version, sha256, profile)


def _without_path(message: str, directory: Path) -> str:
    """A message for HTTP clients: file names stay, the server's directories do not."""
    return message.replace(f"{directory}/", "").replace(str(directory), "the task's files")


class TaskManager:
    def __init__(
        self,
        engine,
        known: dict[str, Task],
        max_resident: int,
        model: ModelSummary,
        registry=None,
        base: str | None = None,
        served_name: str | None = None,
    ):
        self.bank_client = BankClient(engine)
        self.known = known  # servable tasks by name
        self.max_resident = max_resident
        self.model = model
        self.registry, self.base = registry, base  # the registry's tasks of this base model can be added
        self.served_name = served_name or base  # what clients call the base model
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> remap row, least recently used first
        self.in_flight: dict[str, int] = {}
        self.load_seconds: dict[str, float] = {}
        self.rows_per_layer: int | None = None  # the bank's size, once known
        self.layout_checked = False
        self._lock = asyncio.Lock()

    def task_of_key(self, key) -> str | None:
        """The name of the task whose private key this is (for counting a request's tokens)."""
        return next((name for name, task in self.known.items() if task.key == key), None)

    async def acquire(self, name: str) -> Task:
        """Make `name` resident (loading it if needed) and pin it for one request."""
        if name not in self.known:
            raise self.unknown(name)
        self.in_flight[name] = self.in_flight.get(name, 0) + 1
        try:
            return await self.ensure_resident(name)
        except BaseException:
            self.release(name)
            raise

    def release(self, name: str) -> None:
        self.in_flight[name] -= 1

    def unknown(self, name: str) -> TaskError:
        tasks = "".join(f", {task}" for task in sorted(self.known))
        return TaskError(
            f"The model `{name}` does not exist. Servable: {self.served_name} (the base model){tasks}.", 404
        )

    async def ensure_resident(self, name: str) -> Task:
        if (task := self.known.get(name)) is not None and name in self.resident:  # no waiting behind others' loads
            self.resident.move_to_end(name)
            return task
        async with self._lock:
            task = self.known.get(name)
            if task is None:  # removed while this request waited
                raise self.unknown(name)
            if name in self.resident:
                self.resident.move_to_end(name)
                return task
            if not task.directory.is_dir():  # `expert-hub rm`, or the adapter directory was deleted
                del self.known[name]
                raise TaskError(f"task {name} is no longer servable: its adapter files were removed", 404)
            self._check_fits(task)
            while True:
                if len(self.resident) >= self.max_resident:
                    await self._evict_one(name)
                    continue
                result = await self._load(task)
                if result.status == "loaded":
                    return task
                message = _without_path(result.message, task.directory)
                if result.status == "refused":  # its files changed on disk since they were checked
                    del self.known[name]
                    logger.error(
                        "task %s (%s) is no longer servable: adapter refused: %s", name, task.directory, message
                    )
                    raise TaskError(f"cannot load task {name}: {message}", 422)
                message = f"expert bank full: {message}"
                if not self._idle_resident(name):
                    raise TaskError(
                        f"cannot load task {name} now: {message}, and every resident task has requests "
                        "in flight; retry later",
                        503,
                    )
                await self._evict_one(name)

    async def _load(self, task: Task) -> LoadResult:
        """Ask the worker to load `task` (resident once loaded); an unexpected failure there is a 503."""
        started = asyncio.get_running_loop().time()
        try:
            result = await self.bank_client.load_task(task.key, str(task.directory), task.sha256)
        except Exception as error:  # a device error, a dead worker: vLLM's exception carries the worker's message
            message = _without_path(vllm.worker_error_message(error), task.directory)
            raise TaskError(f"cannot load task {task.name} now: {message}", 503) from error
        if result.status == "loaded":
            self.load_seconds[task.name] = asyncio.get_running_loop().time() - started
            self.resident[task.name] = result.row
        return result

    async def add(self, ref: str) -> Task:
        """Make a registry task servable and resident (POST /v1/tasks/{ref}, `ref` = `law`, `law@3`, `law@1f3a`).

        A task that is already servable stays as it is; naming another version of it is a conflict.
        """
        name, _, version = ref.partition("@")
        if name == AUTO:
            raise TaskError(f'a task named "{AUTO}" cannot be served: the name asks the server to choose a task', 400)
        if name not in self.known or version:
            task = await asyncio.to_thread(self._from_registry, ref)  # reads the manifest and safetensors headers
            current = self.known.setdefault(task.name, task)
            if current.directory != task.directory:
                served = f"version {current.version}" if current.version else "an adapter directory"
                raise TaskError(f"task {name} is served from {served}; DELETE /v1/tasks/{name} first", 409)
        return await self.ensure_resident(name)

    def _from_registry(self, ref: str) -> Task:
        if self.registry is None:
            raise TaskError(f"task {ref} is not servable: the server has no registry", 404)
        try:
            entry = self.registry.resolve(ref, self.base)
        except RegistryDamagedError as error:  # the server's own files: logged here, not shown to clients
            logger.error("cannot look up task %s: %s", ref, error)
            raise TaskError(f"cannot look up task {ref!r}: the server's registry is damaged", 500) from error
        except RegistryError as error:
            raise TaskError(f"no task {ref!r} is registered for the served model", 404) from error
        except InvalidInputError as error:  # a malformed name or version
            raise TaskError(str(error), 400) from error
        directory = self.registry.object_path(entry)
        try:
            hashes = self.registry.file_hashes(entry)
            return adapter_task(entry.task, directory, self.model, entry.version, hashes)
        except ExpertHubError as error:
            raise TaskError(f"cannot serve {entry.ref}: {_without_path(str(error), directory)}", 422) from error

    async def remove(self, name: str) -> None:
        """Unload a task (DELETE /v1/tasks/{name}); refused while it has requests in flight."""
        async with self._lock:
            if name not in self.known:
                raise self.unknown(name)
            if self.in_flight.get(name):
                raise TaskError(f"task {name} has {self.in_flight[name]} requests in flight; retry when they end", 409)
            task = self.known.pop(name)  # gone before the first await: no request can pin it from here on
            if self.resident.pop(name, None) is not None:
                await self.bank_client.unload_task(task.key)

    async def bank(self) -> BankInfo:
        """The expert bank as the worker sees it: rows per layer, free rows, bytes."""
        info = await self.bank_client.bank_info()
        self.rows_per_layer = info["rows_per_layer"]
        return info

    async def check_layout(self) -> bool:
        """The worker's start-up check that task experts land in the kernel's layout (see `worker.py`); False when
        the checkpoint has nothing to compare with."""
        try:
            result = await self.bank_client.check_layout()
        except Exception as error:  # e.g. the reference expert's shapes do not fit: vLLM's exception
            raise UnsupportedModelError(vllm.worker_error_message(error)) from error
        if result.status == "wrong_layout":
            raise UnsupportedModelError(result.message)
        self.layout_checked = result.status == "ok"
        return self.layout_checked

    async def describe(self) -> dict:
        """Every servable task with its residency, requests in flight and last load time; and the bank."""
        tasks = [
            {
                "id": name,
                "version": task.version,
                "resident": name in self.resident,
                "in_flight": self.in_flight.get(name, 0),
                "bytes": task.nbytes,
                "load_seconds": self.load_seconds.get(name),
            }
            for name, task in sorted(self.known.items())
        ]
        return {"object": "list", "data": tasks, "bank": await self.bank() | {"layout_checked": self.layout_checked}}

    def _check_fits(self, task: Task) -> None:
        """A task with more experts in some layer than the whole bank holds never loads: say so before evicting."""
        layer, largest = max(task.experts_per_layer.items(), key=lambda item: item[1], default=(None, 0))
        if self.rows_per_layer is not None and largest > self.rows_per_layer:
            raise TaskError(
                f"task {task.name} has {largest} experts in layer {layer} and the expert bank holds "
                f"{self.rows_per_layer} per layer: restart with a larger --expert-bank-rows or "
                "--expert-bank-gb",
                507,
            )

    def _idle_resident(self, keep: str) -> list[str]:
        return [name for name in self.resident if name != keep and not self.in_flight.get(name)]

    async def _evict_one(self, keep: str) -> None:
        idle = self._idle_resident(keep)
        if not idle:
            raise TaskError(
                f"cannot load task {keep} now: every resident task has requests in flight; retry later", 503
            )
        del self.resident[idle[0]]  # before the first await: a request for it now waits for the lock and reloads
        await self.bank_client.unload_task(self.known[idle[0]].key)
