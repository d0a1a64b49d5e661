"""Which tasks the expert bank holds, who uses them, who waits for theirs, and what the bank takes next.

Bookkeeping and policy only, no I/O: `TaskManager` (`manager.py`) asks, runs the loads and evictions decided here,
and grants requests.
- A request for a resident task is admitted at once (pinning the task), unless the task is draining.
- A request for any other task waits in that task's queue. The task whose oldest waiting request is the oldest
  comes next, so a waiting request is served after at most one load per task whose requests are older than it,
  however much traffic hot tasks bring: nothing starves.
- The next task loads as soon as its experts fit each layer's free rows and a task slot is free (remap rows, at most
  `--max-resident-tasks` when given). Otherwise resident tasks make room: those already draining first (they are
  closest to leaving), then idle ones (nothing in flight, nobody waiting), then the least busy and least recently
  used; a task is chosen only if it frees a row or slot the newcomer lacks. They drain: their new requests wait,
  their requests in flight finish, then they are evicted. Every other resident task keeps admitting meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .served_tasks import Task


@dataclass
class Waiter:
    """A request waiting for its task: granted the task (pinned for it), or an error that says why not."""

    arrived: float
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Residency:
    def __init__(self, rows_per_layer: int, slots: int):
        self.rows_per_layer, self.slots = rows_per_layer, slots
        self.resident: OrderedDict[str, Task] = OrderedDict()  # least recently admitted first
        self.in_flight: Counter[str] = Counter()
        self.waiting: dict[str, deque[Waiter]] = {}
        self.draining: set[str] = set()  # making room: they admit no new request
        self.leaving: set[str] = set()  # being removed for good (DELETE): they admit nobody until unloaded

    def admits(self, name: str) -> bool:
        return name in self.resident and name not in self.draining and name not in self.leaving

    def admit(self, name: str) -> None:
        self.in_flight[name] += 1
        self.resident.move_to_end(name)

    def release(self, name: str) -> bool:
        """One request of `name` ended; True when that leaves a draining task ready to leave."""
        self.in_flight[name] -= 1
        if not self.in_flight[name]:
            del self.in_flight[name]
            return name in self.draining
        return False

    def enqueue(self, name: str, now: float) -> Waiter:
        waiter = Waiter(now)
        self.waiting.setdefault(name, deque()).append(waiter)
        return waiter

    def withdraw(self, name: str, waiter: Waiter) -> None:
        """A waiter that gave up (timed out, disconnected) leaves its queue."""
        queue = self.waiting.get(name)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self.waiting[name]

    def take_waiters(self, name: str) -> list[Waiter]:
        return list(self.waiting.pop(name, ()))

    def waiting_count(self) -> int:
        return sum(map(len, self.waiting.values()))

    def oldest_wait(self, now: float) -> float:
        return max((now - queue[0].arrived for queue in self.waiting.values()), default=0.0)

    def admissible_waiters(self) -> list[str]:
        """Tasks with waiting requests that can be admitted now."""
        return [name for name in self.waiting if self.admits(name)]

    def queue(self) -> list[str]:
        """The tasks that are not resident and have waiting requests, the one whose oldest request is oldest first:
        the order they are brought in."""
        candidates = [name for name in self.waiting if name not in self.resident]
        return sorted(candidates, key=lambda name: self.waiting[name][0].arrived)

    def next_task(self) -> str | None:
        return next(iter(self.queue()), None)

    def too_large(self, task: Task) -> str | None:
        """Why `task` can never be resident (more experts in a layer than the bank holds), if so."""
        layer, largest = max(task.experts_per_layer.items(), key=lambda item: item[1], default=(None, 0))
        if largest > self.rows_per_layer:
            return (
                f"task {task.name} has {largest} experts in layer {layer} and the expert bank holds "
                f"{self.rows_per_layer} per layer: restart with a larger --expert-bank-rows or --expert-bank-gb"
            )
        return None

    def used_rows(self) -> Counter[int]:
        used: Counter[int] = Counter()
        for task in self.resident.values():
            used.update(task.experts_per_layer)
        return used

    def victims(self, task: Task) -> list[str] | None:
        """The resident tasks to evict so that `task` fits (none when it fits now); None when it never fits."""
        used, slots, chosen = self.used_rows(), self.slots - len(self.resident), []
        lacking = self._lacking(task, used, slots)
        recency = {name: position for position, name in enumerate(self.resident)}
        order = sorted(
            self.resident.keys() - self.leaving,
            key=lambda name: (
                name not in self.draining,
                self.in_flight[name] > 0 or name in self.waiting,
                self.in_flight[name] + len(self.waiting.get(name, ())),
                recency[name],
            ),
        )
        for name in order:
            if not lacking:
                break
            experts = self.resident[name].experts_per_layer
            if "slot" in lacking or any(layer in lacking for layer in experts):
                chosen.append(name)
                used.subtract(experts)
                slots += 1
                lacking = self._lacking(task, used, slots)
        return None if lacking else chosen

    def _lacking(self, task: Task, used: Counter[int], slots: int) -> set:
        """The layers whose free rows `task` exceeds, and "slot" when no task slot is free."""
        lacking = {
            layer for layer, count in task.experts_per_layer.items() if count > self.rows_per_layer - used[layer]
        }
        return lacking | ({"slot"} if slots < 1 else set())
