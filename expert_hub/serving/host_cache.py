"""The host-memory tier: tasks' rows kept in RAM, so that reloading an evicted task is one copy back.

Rows are kept as the expert kernel holds them (padded; prepacked on CPU): a task read from disk is converted once,
kept here and copied into the bank, and a reload copies the same rows again, with no file read, no hash and no
conversion. Every byte kept was hashed when it was read: the tier holds nothing that was not checked. Entries are
bounded in bytes, the least recently used dropped first (`cachetools.LRUCache`); a task keeps its entry while
resident, so evicting it copies nothing. On a GPU the rows sit in pinned memory, so they go back at the bus's full
speed. It lives in the worker process, beside the bank (`worker.py`), which also stages tasks into it in the
background (`expert_hub_stage_tasks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cachetools
import torch


@dataclass(frozen=True)
class LayerRows:
    """A task's experts in one MoE layer: which base experts they replace, and for each of the kernel's weights
    (w13, w2) their rows stacked in that order, as the kernel holds them: one copy writes them all."""

    experts: list[int]
    weights: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class CachedTask:
    layers: dict[int, LayerRows]  # MoE layer index -> its rows

    @property
    def nbytes(self) -> int:
        return sum(weight.nbytes for rows in self.layers.values() for weight in rows.weights)


class HostCache(cachetools.LRUCache):
    """Task key -> `CachedTask`, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int):
        super().__init__(maxsize=max_bytes, getsizeof=lambda entry: entry.nbytes)

    def keep(self, key: str, task: CachedTask) -> None:
        """Keep `task` under `key`, unless it alone exceeds the tier."""
        if task.nbytes <= self.maxsize:
            self[key] = task
