"""The front end's view of the bank: which tasks are servable and resident, who uses them, who waits for theirs.

A request pins its task (`acquire`) until its response ends (`release`): a pinned task is never evicted or
unloaded. A request whose task is not resident waits for it, up to `wait_timeout`. One scheduler coroutine decides
what the bank holds (`residency.py`: by the waiting requests' age, draining the tasks that make room) and is the
only one that stages, loads and evicts tasks, through `BankClient`. A task is staged first: the worker reads,
hashes and converts it into its host-memory tier in the background while the model keeps stepping (`worker.py`,
`host_cache.py`), so a load stops the model only for the copy into the bank. The tasks behind it in line are staged
after it (up to `STAGE_AHEAD` at once), so the stager is not idle while tasks wait; the victims' eviction and the
load are one call (each call waits for the model's step to end); evicted tasks stay in the tier while it has room.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from typing import TYPE_CHECKING

from expert_hub.errors import ExpertHubError, UnsupportedModelError
from expert_hub.models import ModelSummary
from expert_hub.registry import AUTO

from . import vllm_contract as vllm
from .bank_client import BankClient
from .metrics import TASK_LOADS, TASK_WAIT_TIMEOUTS
from .residency import Residency, Waiter
from .served_tasks import Task, TaskError, check_base_fingerprint, without_path
from .task_source import TaskSource
from .worker import BankInfo

if TYPE_CHECKING:
    from expert_hub.registry import Registry

    from .vllm_contract import EngineClient

logger = logging.getLogger(__name__)


class TaskManager:
    STAGE_POLL_SECONDS = 0.01  # how often the scheduler asks the worker whether a task it stages is ready
    STAGE_AHEAD = 4  # tasks staged at once, in the order they will be brought in

    def __init__(
        self,
        engine: EngineClient,
        known: dict[str, Task],
        model: ModelSummary,
        registry: Registry | None = None,
        base: str | None = None,
        served_name: str | None = None,
        *,
        max_resident: int | None = None,
        wait_timeout: float = 60.0,
        max_waiting: int = 1024,
        allow_pull: tuple[str, ...] = (),
    ):
        self.bank_client = BankClient(engine)
        self.known = known  # servable tasks by name
        self._by_key = {task.key: name for name, task in known.items()}
        self.base = base
        self.source = TaskSource(registry, base, model, allow_pull)  # where tasks added at run time come from
        self.served_name = served_name or base  # what clients call the base model
        self.max_resident, self.wait_timeout, self.max_waiting = max_resident, wait_timeout, max_waiting
        self._pulls: dict[str, asyncio.Future] = {}  # repo -> its pull in progress, shared by every request
        self.residency: Residency | None = None  # once the bank's size is known (`bank()`)
        self.load_seconds: dict[str, float] = {}  # each task's last load, from asking to resident
        self.last_load: dict[str, dict] = {}  # and where it came from, its bytes, its time in the worker
        self.hits: Counter[str] = Counter()  # requests admitted at once ("bank"), loads from "memory" and from "disk"
        self.longest_wait = 0.0  # seconds, of any request granted its task
        self.timeouts = 0
        self.layout_checked = False
        self._bank_lock = asyncio.Lock()  # one bank change at a time: the scheduler's, or a DELETE's
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._poll: asyncio.TimerHandle | None = None  # the next look at a task being staged
        self._staged: dict[str, str] = {}  # task key -> how far its staging got (`_stage`)
        self._checks: dict[str, asyncio.Future] = {}  # task key -> its base check, running beside the scheduler
        self._read_from_disk: set[str] = set()  # keys of tasks staged from their files, not found in host memory

    @property
    def resident(self) -> dict[str, Task]:
        return self.residency.resident if self.residency else {}

    @property
    def in_flight(self) -> Counter[str]:
        return self.residency.in_flight if self.residency else Counter()

    @property
    def _known_residency(self) -> Residency:
        """`residency` where it is known to be set: pins, releases, waiters and the scheduler all come after a
        `_residency()` (a request's, or DELETE's)."""
        assert self.residency is not None, "the bank's size is not known yet"
        return self.residency

    def task_of_key(self, key) -> str | None:
        """The name of the task whose private key this is (for counting a request's tokens)."""
        return self._by_key.get(key) if isinstance(key, str) else None

    async def acquire(self, name: str) -> Task:
        """Pin `name` for one request, waiting (up to `wait_timeout`) while it is not resident."""
        return await self._pin(name, self.wait_timeout)

    async def _pin(self, name: str, timeout: float | None) -> Task:
        if (task := self.known.get(name)) is None:
            task = await self._pulled(name)
            name = task.name
        residency = await self._residency()
        if residency.admits(name):
            residency.admit(name)
            self.hits["bank"] += 1
            return task
        if too_large := residency.too_large(task):  # never fits: say so rather than wait
            raise TaskError(too_large, 507)
        if residency.waiting_count() >= self.max_waiting:
            raise TaskError(
                f"cannot serve task {name} now: {self.max_waiting} requests already wait for their tasks "
                "(--max-waiting-requests); retry later",
                503,
                self._retry_after(),
            )
        loop = asyncio.get_running_loop()
        waiter = residency.enqueue(name, loop.time())
        self._schedule()
        try:
            await asyncio.wait({waiter.granted}, timeout=timeout)
        except asyncio.CancelledError:  # its client went away
            self._give_up(name, waiter)
            raise
        if not waiter.granted.done():
            self._give_up(name, waiter)
            self.timeouts += 1
            TASK_WAIT_TIMEOUTS.inc()
            raise TaskError(
                f"task {name} was not loaded within {timeout:g} s (--task-wait-timeout): the bank is busy "
                "with other tasks' requests; retry later",
                503,
                self._retry_after(),
            )
        self.longest_wait = max(self.longest_wait, loop.time() - waiter.arrived)
        return waiter.granted.result()  # or the TaskError that says why its load failed

    def _give_up(self, name: str, waiter: Waiter) -> None:
        """A waiter leaves: its place in the queue, or the pin it was granted just now."""
        granted = waiter.granted
        if not granted.done():
            self._known_residency.withdraw(name, waiter)
            granted.cancel()
            self._schedule()
        elif granted.exception() is None:
            self.release(name)

    def release(self, name: str) -> None:
        if self._known_residency.release(name):
            self._schedule()

    async def _pulled(self, name: str) -> Task:
        """`name` made servable from the registry, or pulled from the Hub into it first, when `--allow-pull` allows
        it (else a 404); requests asking for it meanwhile share one pull."""
        if not self.source.pullable(name):
            raise self.unknown(name)
        if (pulling := self._pulls.get(name)) is None:
            pulling = self._pulls[name] = asyncio.ensure_future(asyncio.to_thread(self.source.pulled, name))
            pulling.add_done_callback(lambda _: self._pulls.pop(name, None))
        return self._remember(await asyncio.shield(pulling))

    def unknown(self, name: str) -> TaskError:
        shown = sorted(self.known)[:20]
        tasks = "".join(f", {task}" for task in shown)
        more = f" and {len(self.known) - len(shown)} more (GET /v1/tasks)" if len(self.known) > len(shown) else ""
        return TaskError(
            f"The model `{name}` does not exist. Servable: {self.served_name} (the base model){tasks}{more}.", 404
        )

    async def preload(self, names: list[str]) -> None:
        """Load `names` in order while they fit beside each other, evicting nothing and with no time limit
        (start-up; the figures count requests, so they start after it)."""
        residency = await self._residency()
        for name in names:
            if residency.victims(self.known[name]) == []:
                await self._pin(name, None)
                self.release(name)
        self.hits.clear()
        self.longest_wait = 0.0

    def _schedule(self) -> None:
        """Wake the scheduler (started on first use, in the server's event loop)."""
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = asyncio.get_running_loop().create_task(self._run_scheduler())
        self._wake.set()

    async def _run_scheduler(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._schedule_waiting()
            except Exception as error:  # a bug: fail the head of the queue, so that it cannot block the others
                logger.exception("the task scheduler failed")
                if (name := self._known_residency.next_task()) is not None:
                    self._fail_waiters(name, TaskError(f"cannot load task {name} now: {error}", 503))
                    self._schedule()

    async def _schedule_waiting(self) -> None:
        """Admit whoever can be admitted; then bring in the task next in line: staged first (the tasks that will
        make room keep serving meanwhile, and the tasks behind it are staged after it), then, once those have
        drained, loaded in their place."""
        residency = self._known_residency
        while True:
            self._grant_admissible()
            if not (queue := residency.queue()):
                residency.draining.clear()
                return self._grant_admissible()
            task = self.known[queue[0]]  # waiters leave with their task (`_drop`)
            if residency.victims(task) is None:  # larger than the bank can ever make room for
                too_large = residency.too_large(task) or f"task {task.name} does not fit"
                self._fail_waiters(task.name, TaskError(too_large, 507))
                continue
            staged = await self._stage([task, *(self.known[name] for name in queue[1 : self.STAGE_AHEAD])])
            if staged is None or residency.next_task() != task.name or self.known.get(task.name) is not task:
                continue  # refused (its waiters were told why), or the queue changed meanwhile: plan again
            if staged == "staging":
                residency.draining.clear()  # the tasks that will make room serve on while it is read
                self._grant_admissible()
                return self._poll_staging()
            if (victims := residency.victims(task)) is None:
                continue
            residency.draining = set(victims)
            self._grant_admissible()  # a task no longer needed to make room admits its waiters again
            if any(residency.in_flight[victim] for victim in victims):
                return  # `release` wakes the scheduler when they have drained
            async with self._bank_lock:
                if self.known.get(task.name) is task:
                    await self._load_and_grant(task, victims)
                residency.draining.difference_update(victims)

    def _poll_staging(self) -> None:
        """Ask again shortly whether the task being staged is ready (one timer at a time)."""
        if self._poll is None:

            def poll() -> None:
                self._poll = None
                self._schedule()

            self._poll = asyncio.get_running_loop().call_later(self.STAGE_POLL_SECONDS, poll)

    async def _stage(self, tasks: list[Task]) -> str | None:
        """Have the worker read, check and convert `tasks` into its host-memory tier in the background, one after
        another once their base checks have passed (model steps go on meanwhile; only the copy into the bank stops
        them), or ask how far they got. The first task's status: "staging" (its base check or its staging runs),
        "staged", "off" (the tier has no room for it: it is loaded from disk), or None when it was refused (its
        waiters are told why, as are those of any other task refused)."""
        checked = []
        for task in tasks:
            if not task.directory.is_dir():  # `expert-hub rm`, or the adapter directory was deleted
                self._drop(
                    task, TaskError(f"task {task.name} is no longer servable: its adapter files were removed", 404)
                )
            elif self._base_checked(task):
                checked.append(task)
        asked = [task for task in checked if self._staged.get(task.key) != "off"]
        try:
            results = await self.bank_client.stage_tasks(
                [(task.key, str(task.directory), task.sha256) for task in asked]
            )
        except Exception as error:  # a device error, a dead worker
            for task in asked:
                self._fail_waiters(task.name, _worker_failed(task, error))
            return None
        for task, result in zip(asked, results):
            if result.status == "refused":
                self._refuse(task, result.message)
                continue
            if result.status == "staging" and task.key not in self._staged:
                self._read_from_disk.add(task.key)  # for the figures: staged, but read from disk all the same
            self._staged[task.key] = result.status
        if self.known.get(tasks[0].name) is not tasks[0]:
            return None
        head_checked = bool(checked) and checked[0] is tasks[0]
        return self._staged.get(tasks[0].key) if head_checked else "staging"  # else: its base check runs

    def _base_checked(self, task: Task) -> bool:
        """Whether `task`'s base check has passed. Checks run beside the scheduler (whose loads and grants go on),
        one at a time in the order of the line, so that the next task's check overlaps the staging of the one
        before it instead of delaying it (they share the cores); a check's end wakes the scheduler. A task whose
        check failed is dropped, its waiters told why."""
        if (check := self._checks.get(task.key)) is None:
            if task.base_checked or self.base is None:
                return True
            if any(not running.done() for running in self._checks.values()):
                return False
            check = self._checks[task.key] = asyncio.ensure_future(self._check_base(task, self.base))
            check.add_done_callback(lambda _: self._schedule())
        if not check.done():
            return False
        del self._checks[task.key]
        try:
            check.result()  # an unexpected error goes on to the scheduler's own handling
        except TaskError as error:
            self._drop(task, error)
            return False
        return True

    @staticmethod
    async def _check_base(task: Task, base: str) -> None:
        """A task's base fingerprint, compared at its first load (`check_base_fingerprint`): a 422 if it differs."""
        try:
            await asyncio.to_thread(check_base_fingerprint, base, task)
        except ExpertHubError as error:
            raise TaskError(
                f"cannot serve task {task.name}: {without_path(str(error), task.directory)}", 422
            ) from error

    def _grant_admissible(self) -> None:
        residency = self._known_residency
        for name in residency.admissible_waiters():
            for waiter in residency.take_waiters(name):
                if not waiter.granted.done():
                    residency.admit(name)
                    waiter.granted.set_result(self.known[name])

    def _fail_waiters(self, name: str, error: TaskError) -> None:
        for waiter in self._known_residency.take_waiters(name):
            if not waiter.granted.done():
                waiter.granted.set_exception(error)

    async def _load_and_grant(self, task: Task, victims: list[str]) -> None:
        """Evict drained `victims` (their rows stay in the host-memory tier) and load `task` in their place (with the
        bank lock held), then admit its waiters, or tell them why it cannot load."""
        self._staged.pop(task.key, None)
        started = asyncio.get_running_loop().time()
        evicted = [self.resident.pop(victim).key for victim in victims if victim in self.resident]
        try:
            result = await self.bank_client.load_task(task.key, str(task.directory), task.sha256, evicted)
        except Exception as error:  # a device error, a dead worker
            return self._fail_waiters(task.name, _worker_failed(task, error))
        tier = "disk" if task.key in self._read_from_disk else result.source
        self._read_from_disk.discard(task.key)
        if result.status == "loaded":
            assert tier is not None  # the worker says where a loaded task's rows came from
            self.load_seconds[task.name] = asyncio.get_running_loop().time() - started
            self.last_load[task.name] = {"from": tier, "bytes": result.nbytes, "copy_seconds": result.seconds}
            self._known_residency.resident[task.name] = task
            self.hits[tier] += 1
            TASK_LOADS.labels(source=tier).inc()
            return self._grant_admissible()
        if result.status == "refused":  # its files changed on disk since they were checked
            return self._refuse(task, result.message)
        message = without_path(result.message, task.directory)
        logger.error("the expert bank refused task %s, which the scheduler expected to fit: %s", task.name, message)
        self._fail_waiters(task.name, TaskError(f"cannot load task {task.name} now: expert bank full: {message}", 503))

    def _refuse(self, task: Task, message: str) -> None:
        """The worker refused the task's files (changed on disk since they were checked): it is dropped."""
        message = without_path(message, task.directory)
        logger.error("task %s (%s) is no longer servable: adapter refused: %s", task.name, task.directory, message)
        self._drop(task, TaskError(f"cannot load task {task.name}: {message}", 422))

    def _drop(self, task: Task, error: TaskError) -> None:
        """`task` is no longer servable: its waiters get `error` (unless it was replaced meanwhile: a new version
        added under its name keeps its own waiters)."""
        if self.known.get(task.name) is task:
            self._forget(task)
            self._fail_waiters(task.name, error)

    def _retry_after(self) -> int:
        """Seconds until the tasks waiting now have probably been loaded once each."""
        loads = sorted(self.load_seconds.values())
        typical = loads[len(loads) // 2] if loads else 1.0
        waiting = len(self.residency.waiting) if self.residency else 0
        return max(1, math.ceil(typical * (waiting + 1)))

    def _forget(self, task: Task) -> None:
        if self.known.get(task.name) is task:
            del self.known[task.name]
        self._by_key.pop(task.key, None)
        self._staged.pop(task.key, None)
        self._checks.pop(task.key, None)

    def _remember(self, task: Task) -> Task:
        current = self.known.setdefault(task.name, task)
        self._by_key.setdefault(current.key, current.name)
        return current

    async def add(self, ref: str) -> Task:
        """Make a registry task servable and resident (POST /v1/tasks/{ref}, `ref` = `law`, `law@3`, `law@1f3a`).

        A task that is already servable stays as it is; naming another version of it is a conflict.
        """
        name, _, version = ref.partition("@")
        if name == AUTO:
            raise TaskError(f'a task named "{AUTO}" cannot be served: the name asks the server to choose a task', 400)
        if name not in self.known or version:
            task = await asyncio.to_thread(self.source.registered, ref)  # reads the manifest and safetensors headers
            current = self._remember(task)
            if current.directory != task.directory:
                served = f"version {current.version}" if current.version else "an adapter directory"
                raise TaskError(f"task {name} is served from {served}; DELETE /v1/tasks/{name} first", 409)
        task = await self.acquire(name)
        self.release(name)
        return task

    async def remove(self, name: str) -> None:
        """Unload a task for good (DELETE /v1/tasks/{name}); refused while it has requests in flight, and requests
        waiting for it are told it is gone. Until its rows are free it admits nobody: a version added again under
        its name meanwhile waits, then loads into rows of its own."""
        residency = await self._residency()
        if (task := self.known.get(name)) is None:
            raise self.unknown(name)
        if residency.in_flight[name]:
            raise TaskError(f"task {name} has {residency.in_flight[name]} requests in flight; retry when they end", 409)
        self._drop(task, TaskError(f"task {name} was removed while this request waited for it", 404))
        residency.leaving.add(name)
        try:
            async with self._bank_lock:
                await self.bank_client.unload_task(task.key)  # from the bank and the host-memory tier
                if residency.resident.get(name) is task:
                    del residency.resident[name]
        finally:
            residency.leaving.discard(name)
            self._schedule()

    async def bank(self) -> BankInfo:
        """The expert bank as the worker sees it: rows per layer, free rows, task slots, the host-memory tier."""
        info = await self.bank_client.bank_info()
        if self.residency is None:
            slots = min(info["task_slots"], self.max_resident or info["task_slots"])
            self.residency = Residency(info["rows_per_layer"], slots)
        return info

    async def page(self, limit: int, after: str | None) -> tuple[list[str], bool]:
        """`limit` servable task names after `after`, in order, and whether more follow (GET /v1/tasks)."""
        await self._residency()
        names = sorted(name for name in self.known if after is None or name > after)
        return names[:limit], len(names) > limit

    async def _residency(self) -> Residency:
        if self.residency is None:
            await self.bank()
        return self._known_residency

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


def _worker_failed(task: Task, error: Exception) -> TaskError:
    """A 503 for `task`'s requests when a bank call failed unexpectedly (a device error, a dead worker): vLLM's
    exception carries the worker's own message, shown without the server's paths."""
    message = without_path(vllm.worker_error_message(error), task.directory)
    return TaskError(f"cannot load task {task.name} now: {message}", 503)
