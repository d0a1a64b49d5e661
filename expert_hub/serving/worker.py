"""Task loading inside vLLM's worker process (a `--worker-extension-cls`, called through `collective_rpc`).

Loading a task copies its experts into free bank rows, converted to the expert kernel's weight layout, then
publishes its remap row; unloading frees them. The front end decides what to load and when (see `manager.py`) and
calls these methods through `bank_client.BankClient`. Expected outcomes (loaded, bank full, adapter refused; the
layout check's verdict) come back as plain-data results, which cross the process boundary as they are; only
unexpected failures raise. vLLM's objects are reached through `vllm_contract`.

Under tensor parallelism each rank runs every call on its own shard of the experts (`_shard`); the same calls
in the same order leave every rank with the same rows, and the front end checks that their replies agree.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypedDict, cast

import torch

from expert_hub.adapter import ExpertAdapter
from expert_hub.errors import ExpertHubError
from expert_hub.families import PROJECTIONS, expert_checkpoint_key
from expert_hub.models import checkpoint_tensors

from . import bank
from . import vllm_contract as vllm
from .bank import BankedLayer
from .host_cache import CachedTask, HostCache, LayerRows

_EXPERT_TENSORS = tuple(f"{projection}.weight" for projection in PROJECTIONS)


@dataclass(frozen=True)
class LoadResult:
    """What loading a task did. `bank_full`: not enough free rows or task slots (the front end evicts an idle task
    and retries); `refused`: the adapter's files cannot be served (changed on disk since the front end checked
    them), never retried."""

    status: Literal["loaded", "bank_full", "refused"]
    row: int | None = None  # the task's remap row, when loaded
    message: str = ""
    source: Literal["bank", "memory", "disk", None] = None  # where a loaded task's rows came from
    nbytes: int = 0  # written into the bank
    seconds: float = 0.0  # the load's time in this worker (each rank's own)


@dataclass(frozen=True)
class LayoutResult:
    """The start-up layout check: `no_reference` when the checkpoint has no per-expert tensors to compare with."""

    status: Literal["ok", "no_reference", "wrong_layout"]
    message: str = ""


class BankInfo(TypedDict):
    layers: int
    rows_per_layer: int
    free_rows_per_layer: int
    task_slots: int  # remap rows besides the base's: at most this many tasks are resident
    bytes: int
    bytes_per_row: int  # one row in every layer
    host_cache_tasks: int  # evicted tasks whose rows the host-memory tier keeps
    host_cache_bytes: int
    host_cache_max_bytes: int


class ExpertBankWorker:
    """Mixed into vLLM's worker class. Results are returned as dicts (`asdict`): vLLM sends them to the front end
    as msgpack."""

    def expert_hub_bank_info(self) -> BankInfo:
        banked = _banked_layers(vllm.served_model(self))
        layers, cache = banked.values(), _host_cache()
        return BankInfo(
            layers=len(layers),
            rows_per_layer=min(map(_extra_rows, layers)),
            free_rows_per_layer=min(len(layer.free_rows) for layer in layers),
            task_slots=_remap_rows(banked),
            bytes=sum(_row_bytes(layer) * _extra_rows(layer) for layer in layers),
            bytes_per_row=sum(map(_row_bytes, layers)),
            host_cache_tasks=len(cache),
            host_cache_bytes=cast(int, cache.currsize),  # cachetools types sizes as float (its maxsize may be inf)
            host_cache_max_bytes=cast(int, cache.maxsize),
        )

    @torch.no_grad()
    def expert_hub_check_layout(self) -> dict:
        """Write one base expert from the checkpoint into a spare row as tasks are written, and compare it with the
        row vLLM loaded. A backend whose kernel layout `vllm_contract.kernel_layout` does not reproduce (FlashInfer's
        swapped halves, quantized weights) then fails at start-up instead of serving wrong
        tokens. Each tensor-parallel rank checks its own shard. A `LayoutResult`."""
        index, layer = min(_banked_layers(vllm.served_model(self)).items())
        keys = {name: expert_checkpoint_key(index, 0, name) for name in _EXPERT_TENSORS}
        directory = _local_checkpoint(*vllm.served_checkpoint(self))
        found = checkpoint_tensors(directory, set(keys.values())) if directory else {}
        if len(found) != len(keys) or not layer.free_rows:
            return asdict(LayoutResult("no_reference"))
        return asdict(check_row_layout(layer, layer.free_rows[0], 0, {name: found[key] for name, key in keys.items()}))

    @torch.no_grad()
    def expert_hub_stage_tasks(self, tasks: list[tuple[str, str, dict[str, str] | None]]) -> list[dict]:
        """Read, check and convert tasks (key, directory, sha256) into the host-memory tier in the background, one
        after another in the order given, while the model keeps stepping; asked again, say how far each got. A
        `StageResult` each: "staging", "staged" (its next load is a copy), "refused" (as a load would be), or "off"
        (the tier has no room for it: load it from disk)."""
        _collect_staged()
        layers = _banked_layers(vllm.served_model(self))
        return [asdict(_stage(layers, key, directory, sha256)) for key, directory, sha256 in tasks]

    @torch.no_grad()
    def expert_hub_load_task(
        self, key: str, directory: str, sha256: dict[str, str] | None = None, evict: Sequence[str] = ()
    ) -> dict:
        """Evict the tasks `evict` (drained: their rows stay in the host-memory tier), then write the task's experts
        into free rows and publish its remap row under `key`. A `LoadResult`. One call, not one per task: each call
        waits for the model's step to end.

        From the host-memory tier when it keeps the task (a copy, nothing read or hashed), else from `directory`.
        All or nothing: the adapter is read (once: a registry task's files are hashed from the same bytes, against
        `sha256`), checked (finite weights, experts the served model has, shapes) and converted to the kernel's
        layout before the bank is touched; a failure while writing gives every row back (and raises).
        """
        for evicted in evict:
            self.expert_hub_unload_task(evicted, keep=True)
        if key in bank.TASK_ROWS:
            return asdict(LoadResult("loaded", bank.TASK_ROWS[key], source="bank"))
        started = time.perf_counter()
        layers = _banked_layers(vllm.served_model(self))
        source: Literal["memory", "disk"]
        if (cached := _host_cache().get(key)) is not None:
            source = "memory"
        else:
            try:
                cached = _read_on_server_cores(_kernel_rows_from_disk, layers, directory, sha256)
            except (ExpertHubError, ValueError, OSError) as error:
                return asdict(LoadResult("refused", message=str(error)))
            source = "disk"
        if full := _room_for(cached, layers):
            return asdict(LoadResult("bank_full", message=full))
        row = min(set(range(1, _remap_rows(layers) + 1)) - set(bank.TASK_ROWS.values()))
        try:
            for index, rows in cached.layers.items():
                layer = layers[index]
                targets = bank.take_rows(layer.free_rows, len(rows.experts))
                layer.task_rows[row] = list(zip(rows.experts, targets))
                vllm.write_kernel_rows(layer, targets, rows.weights)
                bank.point_remap_row(layer, row, rows.experts, targets)
        except BaseException:
            bank.release_task_row(layers.values(), row)
            raise
        bank.TASK_ROWS[key] = row  # published last: tokens are tagged with the row only from now on
        if source == "disk":
            _host_cache().keep(key, cached)
        return asdict(LoadResult("loaded", row, "", source, cached.nbytes, time.perf_counter() - started))

    @torch.no_grad()
    def expert_hub_unload_task(self, key: str, keep: bool = False) -> bool:
        """Free the task's rows; `keep` (an eviction) leaves its rows in the host-memory tier (where its load put
        them, while the tier had room for them). A task unloaded for good (DELETE) leaves nothing in either."""
        row = bank.TASK_ROWS.pop(key, None)  # untagged first, so no new token uses the rows being freed
        if not keep:
            _host_cache().pop(key, None)
            if (staging := _STAGING.pop(key, None)) is not None:
                staging.cancel()  # if it has not started; else its rows are dropped when it ends
        if row is None:
            return False
        bank.release_task_row(_banked_layers(vllm.served_model(self)).values(), row)
        return True


@dataclass(frozen=True)
class StageResult:
    status: Literal["staging", "staged", "refused", "off"]
    message: str = ""


_STAGING: dict[str, Future] = {}  # task key -> its rows being read in the background
_LARGER_THAN_THE_TIER: set[str] = set()  # task keys staged once, too large to keep: loaded from disk


def _collect_staged() -> None:
    """Move every task staged by now into the host-memory tier (bounded there), whoever asks: a staging whose
    requests all gave up holds no memory outside the tier. Refusals stay until their task is asked about."""
    for key, staging in list(_STAGING.items()):
        if staging.done() and not staging.cancelled() and staging.exception() is None:
            del _STAGING[key]
            if (cached := staging.result()).nbytes <= _host_cache().maxsize:
                _host_cache()[key] = cached
            else:
                _LARGER_THAN_THE_TIER.add(key)


def _stage(layers: dict[int, BankedLayer], key: str, directory: str, sha256: dict[str, str] | None) -> StageResult:
    """Start staging one task on the stager thread (queued behind those staging), or say how far it got."""
    if key in _host_cache() or key in bank.TASK_ROWS:
        return StageResult("staged")
    if not _host_cache().maxsize or key in _LARGER_THAN_THE_TIER:
        return StageResult("off")
    if (staging := _STAGING.get(key)) is None:
        _STAGING[key] = _stager().submit(_staged, layers, directory, sha256)
        return StageResult("staging")
    if not staging.done():
        return StageResult("staging")
    del _STAGING[key]  # done, and not collected: refused
    try:
        staging.result()
    except (ExpertHubError, ValueError, OSError) as error:
        return StageResult("refused", str(error))
    raise RuntimeError(f"task {key[:8]}... was staged but not kept")  # unreachable: `_collect_staged` kept it


def _staged(layers: dict[int, BankedLayer], directory: str, sha256: dict[str, str] | None) -> CachedTask:
    """`_kernel_rows_from_disk` on the stager thread, then the C heap trimmed.

    Reading a task allocates and frees tens of MiB of temporaries in the stager's heap while rows kept in the tier
    live on, and rows the tier drops are freed by the worker's main thread: glibc keeps freed pages. With neither
    this trim nor `_map_large_buffers` the worker grew by about 18 MiB per round of a soak with evictions
    (`bench_many_tasks.py`)."""
    try:
        return _kernel_rows_from_disk(layers, directory, sha256)
    finally:
        _trim_heap()
        _bind_to_spare_cores()


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`; nothing elsewhere)."""
    if (trim := getattr(_libc(), "malloc_trim", None)) is not None:
        trim(0)


def _map_large_buffers() -> None:
    """Serve every allocation of 1 MiB or more from its own mapping, given back to the system when freed (glibc's
    `M_MMAP_THRESHOLD`). By default glibc raises that threshold to the largest block freed so far (up to 32 MiB), so
    after the first task is dropped from the tier, tasks' rows of a few MiB come from the heap, whose freed space
    other allocations then pin."""
    if (mallopt := getattr(_libc(), "mallopt", None)) is not None:
        mallopt(_M_MMAP_THRESHOLD, 1 << 20)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@functools.cache
def _libc():
    return ctypes.CDLL(None) if sys.platform == "linux" else None


def _kernel_rows_from_disk(layers: dict[int, BankedLayer], directory: str, sha256: dict[str, str] | None) -> CachedTask:
    """The adapter's experts read (a registry task's files hashed from the same bytes), checked (finite weights,
    experts the served model has, shapes) and converted to each layer's kernel layout, in host memory (pinned when
    the bank is on a GPU), each layer's rows stacked."""
    adapter = ExpertAdapter.load(directory, sha256)
    stacked = {}
    for index, experts in _checked_experts(adapter, layers).items():
        layer = layers[index]
        weights: tuple[torch.Tensor, ...] = vllm.kernel_layout(
            layer, [_shard(layer, _expert_tensors(adapter, index, e)) for e in experts]
        )
        if vllm.expert_weights(layer)[0].is_cuda:
            weights = tuple(weight.pin_memory() for weight in weights)
        stacked[index] = LayerRows(list(experts), weights)
    return CachedTask(stacked)


def _room_for(task: CachedTask, layers: dict[int, BankedLayer]) -> str | None:
    """Why the bank cannot take `task` now (too few free rows in a layer, no free remap row); None when it can."""
    for index, rows in task.layers.items():
        if len(rows.experts) > len(layers[index].free_rows):
            free = len(layers[index].free_rows)
            return f"the task needs {len(rows.experts)} expert rows in layer {index}; {free} are free"
    if len(bank.TASK_ROWS) >= _remap_rows(layers):
        return f"all {_remap_rows(layers)} task slots are in use"
    return None


def _remap_rows(layers: dict[int, BankedLayer]) -> int:
    return next(iter(layers.values())).task_remap.shape[0] - 1


@functools.cache
def _host_cache() -> HostCache:
    """This worker's host-memory tier, sized by `expert-hub serve` (`BankSettings.host_cache_bytes`)."""
    settings = bank.BankSettings.from_env()
    return HostCache(settings.host_cache_bytes if settings else 0)


def _read_on_server_cores(function, *args):
    """`function(*args)` on every core the server has, not only the worker's compute cores.

    vLLM binds the CPU worker's threads, and so the threads they start, to the cores it computes on: one of the two
    on a 2-core machine, where reading a task's files and hashing them would then take turns on one core. Model
    steps wait for a load anyway (the worker runs one call at a time), so the load's threads may also use the cores
    vLLM keeps for its scheduler and API server, and reading and hashing the task's files then run side by side
    instead of taking turns (the measured gain: benchmarks/results/serving.md, History).
    """
    if (cores := vllm.server_cores()) is None:
        return function(*args)
    with ThreadPoolExecutor(1, initializer=os.sched_setaffinity, initargs=(0, cores)) as loader:
        return loader.submit(function, *args).result()


@functools.cache
def _stager() -> ThreadPoolExecutor:
    """The background thread that stages tasks while the model steps, on `_spare_cores`, so that it slows the
    model's steps as little as the machine allows."""
    _map_large_buffers()
    return ThreadPoolExecutor(1, initializer=_bind_to_spare_cores)


@functools.cache
def _spare_cores() -> set[int] | None:
    """The cores the server has besides the worker's compute cores (those vLLM keeps for its scheduler and API
    server), or all of them where none are left; None where the platform has no CPU affinity. Asked first by the
    stager at its start, whose binding is still the one it inherited from the worker's main thread: the compute
    cores."""
    if (cores := vllm.server_cores()) is None:
        return None
    return cores - os.sched_getaffinity(0) or cores


def _bind_to_spare_cores() -> None:
    """Bind the calling thread to `_spare_cores`, at its start and again after each task it stages.

    vLLM has OpenMP bind the worker's threads to its compute cores (`GOMP_CPU_AFFINITY` or `OMP_PLACES`), and
    OpenMP binds any thread that way at its first parallel region: the stager's first prepacking for the CPU
    kernel. Undone once, it stays undone; left alone, the stager staged every task on the model's own core, which
    slowed the model's steps instead of taking the cores that wait for them."""
    if (spare := _spare_cores()) is not None:
        os.sched_setaffinity(0, spare)


def _checked_experts(adapter: ExpertAdapter, layers: dict[int, BankedLayer]) -> dict[int, list[int]]:
    """The adapter's experts per layer, refused unless the served model has every one of them."""
    for index, experts in adapter.selection.experts.items():
        if index not in layers:
            raise ValueError(f"layer {index} is not an MoE layer of the served model")
        if bad := [expert for expert in experts if not 0 <= expert < layers[index].base_experts]:
            raise ValueError(f"layer {index} has {layers[index].base_experts} experts; the task names expert {bad[0]}")
    return adapter.selection.experts


def _expert_tensors(adapter: ExpertAdapter, layer: int, expert: int) -> dict[str, torch.Tensor]:
    return {name: adapter.tensors[expert_checkpoint_key(layer, expert, name)] for name in _EXPERT_TENSORS}


def check_row_layout(layer, row: int, expert: int, tensors: dict[str, torch.Tensor]) -> LayoutResult:
    """Write `expert`'s checkpoint tensors into the free `row` and compare it with the loaded `expert` row."""
    weights = vllm.expert_weights(layer)
    try:
        vllm.write_kernel_rows(layer, [row], vllm.kernel_layout(layer, [_shard(layer, tensors)]))
        same = all(torch.equal(weight[row], weight[expert]) for weight in weights)
    finally:
        for weight in weights:
            weight[row].zero_()
    if same:
        return LayoutResult("ok")
    return LayoutResult(
        "wrong_layout",
        f"{vllm.expert_kernel_name(layer)} keeps expert weights in a layout the "
        "expert bank cannot write yet: a base expert written as tasks are did not match the loaded "
        "one; serve merged checkpoints instead",
    )


def _local_checkpoint(model: str, revision: str | None) -> str | None:
    """The served checkpoint's local directory (a Hub model is in the cache by now: vLLM has loaded it)."""
    if Path(model).is_dir():
        return model
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(model, revision=revision, local_files_only=True, allow_patterns=["*.safetensors"])
    except (LocalEntryNotFoundError, HFValidationError):  # elsewhere (a --download-dir): nothing to compare with
        return None


@functools.lru_cache(maxsize=8)
def _banked_layers(model) -> dict[int, BankedLayer]:
    """Layer index -> the banked experts module of that MoE layer."""
    layers: dict[int, BankedLayer] = {}
    for module_name, module in model.named_modules():
        if getattr(module, "expert_hub_bank", False):
            layers[int(module_name.split("layers.")[1].split(".")[0])] = module
    if not layers:
        raise RuntimeError("the served model has no expert bank: was it started by `expert-hub serve`?")
    return layers


def _row_bytes(layer) -> int:
    return sum(weight[0].nbytes for weight in vllm.expert_weights(layer))


def _extra_rows(layer) -> int:
    return vllm.expert_weights(layer)[0].shape[0] - layer.base_experts


def _shard(layer, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's gate, up and down (checkpoint layout) as this rank holds them: under tensor parallelism its
    slice of the intermediate dimension, cut as vLLM's weight loader cuts the base experts."""
    gate, up, down = (tensors[name] for name in _EXPERT_TENSORS)
    intermediate, hidden = layer.expert_sizes
    shard, shards = layer.expert_shard
    full = intermediate * shards
    if not gate.shape == up.shape == (full, hidden) or down.shape != (hidden, full):
        raise ValueError(
            f"expert shapes {tuple(gate.shape)} / {tuple(up.shape)} / {tuple(down.shape)} do not fit "
            f"the served model's gate / up {(full, hidden)} and down {(hidden, full)}"
        )
    part = slice(shard * intermediate, (shard + 1) * intermediate)
    return gate[part], up[part], down[:, part]
