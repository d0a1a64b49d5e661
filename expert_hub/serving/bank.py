"""The expert bank inside vLLM: extra physical expert rows per MoE layer and a per-token task remap.

ESFT changes only which weights some (layer, expert) pairs use, so one shared base model can serve many tasks in
one batch: every MoE layer holds its E base experts plus extra rows (as many as `BankSettings` says), and a table
`remap[task_row, expert]` (row 0 = the base model) sends each token's top-k ids to the physical rows of its task.
The router is untouched; the normal expert kernel runs on the remapped ids.

A request's task reaches the worker as `SamplingParams.extra_args[TASK_ARG]`: not the task's name but its private
key, a random value only the server's front end knows and sets (`served_tasks.py`). A client that writes `vllm_xargs`
itself, on any endpoint, cannot name a key it has never seen, so its request runs on the base experts.

Every newly allocated KV block is zeroed before use (vLLM's own mechanism, which it enables only for Mamba and
mixed-precision caches). The CPU attention kernel reads whole blocks and weights the unused slots by zero, and zero
times NaN is NaN: without this, one request whose task produced non-finite values would leave them in blocks that
later requests of every task reuse.

This module is a `vllm.general_plugins` entry point, so vLLM imports it in every process it spawns. It changes
nothing unless `BankSettings` are in the environment (`expert-hub serve` puts them there), so plain vLLM in the
same environment is unaffected. How it hooks into vLLM is `vllm_contract`'s business; which rows a task takes and
gives back is here, and the worker-side loading that calls it lives in `worker.py`.
"""

from __future__ import annotations

import bisect
import ctypes
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch

from . import vllm_contract as vllm

TASK_ARG = "expert_hub_task"  # the SamplingParams.extra_args key that carries a task's private key
_MAX_TOKENS = 1 << 16

# Per-token task row of the batch being run (0 = base model), filled before each forward; padding stays 0.
TOKEN_TASK_ROWS = torch.zeros(_MAX_TOKENS, dtype=torch.long)
# A task's private key -> its remap row, in the worker process. `worker.py` fills it when it loads a task.
TASK_ROWS: dict[str, int] = {}


@dataclass(frozen=True)
class BankSettings:
    """The bank's size, from `expert-hub serve` to vLLM's processes (which vLLM spawns: the environment carries it).

    Physical rows per MoE layer: `extra_rows`, or as many as `bytes_per_layer` (in the served dtype) hold, or the
    fewer of the two when both are given (the default size: room for every task being served, within a share of the
    device's free memory that `serve` measured once, so that every tensor-parallel rank gets the same rows).
    `max_tasks` remap rows besides the base row cap how many tasks are resident at once; None leaves residency to
    the rows (one remap row per physical row of every layer: a task uses at least one). `host_cache_bytes` of host
    memory per rank keep tasks' rows (`host_cache.py`)."""

    extra_rows: int | None
    bytes_per_layer: int | None
    max_tasks: int | None
    moe_layers: int
    host_cache_bytes: int = 0

    ENV = "EXPERT_HUB_BANK"

    def to_env(self) -> dict[str, str]:
        return {self.ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> BankSettings | None:
        """The settings `expert-hub serve` set, None in a vLLM started any other way."""
        value = os.environ.get(cls.ENV)
        return cls(**json.loads(value)) if value else None

    def rows_per_layer(self, sizes: vllm.ExpertSizes, dtype: torch.dtype) -> int:
        """Rows per layer: experts (gate, up and down; this rank's shard of each under tensor parallelism), as
        many as given and as the byte budget (then per device) holds."""
        held = (
            []
            if self.bytes_per_layer is None
            else [self.bytes_per_layer // (3 * sizes.hidden * sizes.intermediate * dtype.itemsize)]
        )
        return min([*held, *([] if self.extra_rows is None else [self.extra_rows])])

    def remap_rows(self, extra_rows: int) -> int:
        """Remap rows besides the base's."""
        return self.max_tasks or max(1, extra_rows * self.moe_layers)


def register() -> None:
    """vLLM plugin entry point: swap in the banked experts layer and the per-token task tagging."""
    settings = BankSettings.from_env()
    if settings is None:
        return
    _end_with_parent()
    vllm.enable_kv_cache_zeroing()
    vllm.replace_routed_experts(settings.rows_per_layer, _bank_initialiser(settings), _remap_topk_ids)
    vllm.after_input_preparation(_tag_tokens_with_tasks)


def _end_with_parent() -> None:
    """In a process vLLM spawned for the server (its engine, the engine's workers): be sent SIGTERM when the parent
    dies, which vLLM handles as a shutdown. A server killed outright (SIGKILL, the OOM killer) then leaves no engine
    behind holding the model and the device's memory."""
    if sys.platform != "linux" or (parent := multiprocessing.parent_process()) is None:  # the server's own process
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if not parent.is_alive():  # it died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


class BankedLayer(Protocol):
    """A routed experts layer with its bank, as `init_bank` sets it up (vLLM's layer class gains these attributes
    at run time: `worker.py` reads them through this)."""

    base_experts: int
    expert_sizes: tuple[int, int]  # (intermediate, hidden) of one expert on this rank
    expert_shard: tuple[int, int]  # (shard, shards): this rank's slice of the intermediate dimension
    task_remap: torch.Tensor  # [remap rows, base experts] -> physical row
    free_rows: list[int]  # sorted: a task's rows are taken as a run of consecutive ones where there is one
    task_rows: dict[int, list[tuple[int, int]]]  # remap row -> (expert, physical row) pairs it holds


def take_rows(free_rows: list[int], count: int) -> list[int]:
    """Take `count` rows from `free_rows` (kept sorted): the shortest run of consecutive free rows that holds them
    all, so that they are written with one copy per weight (`write_kernel_rows`), else the lowest free rows. Every
    tensor-parallel rank makes the same choice, as it makes the same calls."""
    fitting = [(length, offset) for _, length, offset in vllm.consecutive_runs(free_rows) if length >= count]
    start = min(fitting, default=(count, 0))[1]
    taken = free_rows[start : start + count]
    del free_rows[start : start + count]
    return taken


def point_remap_row(layer: BankedLayer, row: int, experts: list[int], targets: list[int]) -> None:
    """Send `experts` to their bank rows `targets` in the task's remap row `row`. On CPU through a NumPy view of the
    table: torch's dispatch of the same write was half of what a reload spent besides its copy
    (benchmarks/results/serving.md, History)."""
    if layer.task_remap.device.type == "cpu":
        layer.task_remap.numpy()[row, experts] = targets
    else:
        layer.task_remap[row, torch.tensor(experts)] = torch.tensor(targets, dtype=layer.task_remap.dtype)


def release_task_row(layers: Iterable[BankedLayer], row: int) -> None:
    """Give a remap row's physical rows back, zeroed, and point the row at the base experts again."""
    for layer in layers:
        layer.task_remap[row] = torch.arange(layer.base_experts, dtype=layer.task_remap.dtype)
        for _, physical in layer.task_rows.pop(row, []):
            for weight in vllm.expert_weights(layer):
                weight[physical].zero_()
            bisect.insort(layer.free_rows, physical)


def _bank_initialiser(settings: BankSettings):
    """Set up a new experts layer's bank: spare rows zeroed and free, every remap row on the base experts."""

    def init_bank(layer, sizes: vllm.ExpertSizes, extra_rows: int) -> None:
        layer.base_experts, layer.expert_sizes = sizes.experts, (sizes.intermediate, sizes.hidden)
        layer.expert_shard = (sizes.shard, sizes.shards)
        with torch.no_grad():  # some loaders fill extra rows with copies, others leave them uninitialised
            for weight in vllm.expert_weights(layer):
                weight[sizes.experts :].zero_()
        identity = torch.arange(sizes.experts, dtype=torch.int32)
        layer.register_buffer("task_remap", identity.repeat(settings.remap_rows(extra_rows) + 1, 1), persistent=False)
        layer.free_rows = list(range(sizes.experts, sizes.experts + extra_rows))
        layer.task_rows = {}  # remap row -> (expert, physical row) pairs it holds

    return init_bank


def _remap_topk_ids(layer, topk_ids: torch.Tensor) -> torch.Tensor:
    """Each token's top-k expert ids, sent to the physical rows of its task."""
    rows = TOKEN_TASK_ROWS[: topk_ids.shape[0]].to(topk_ids.device, non_blocking=True)
    return layer.task_remap[rows.unsqueeze(1), topk_ids.long()].contiguous()


def _tag_tokens_with_tasks(request_args: list[dict], num_scheduled_tokens: np.ndarray) -> None:
    """Each scheduled token gets its request's task row (the base row unless it carries a loaded task's key)."""
    rows = np.zeros(len(request_args), dtype=np.int64)
    for position, args in enumerate(request_args):
        key = args.get(TASK_ARG)
        rows[position] = TASK_ROWS.get(key, 0) if isinstance(key, str) else 0  # lists are unhashable
    per_token = torch.from_numpy(np.repeat(rows, num_scheduled_tokens))
    TOKEN_TASK_ROWS[: per_token.shape[0]] = per_token
    TOKEN_TASK_ROWS[per_token.shape[0] :].zero_()
