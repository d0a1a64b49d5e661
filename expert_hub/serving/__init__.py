"""Serving task experts on vLLM: one shared base model, each request with its task's experts.

`run_server` checks the installed vLLM, resolves the tasks (headers only), sizes the expert bank and the host-memory
tier, starts vLLM's OpenAI server with the bank plugin and worker extension, and serves until stopped. The modules:
- `vllm_contract.py`: every vLLM internal expert-hub uses, resolved in one place, and the supported vLLM range;
- `bank.py`: the bank inside vLLM's processes (plugin entry point, `BankSettings`, per-token task rows);
- `worker.py`: task staging and loading in the worker process, returning `LoadResult` / `LayoutResult`;
- `host_cache.py`: the worker's host-memory tier of tasks' rows;
- `bank_client.py`: the front end's typed client for those worker methods;
- `config.py`: `ServeConfig`, every `serve` option declared once;
- `served_tasks.py`: a servable task (its files, experts and private key);
- `manager.py`: which tasks are servable and resident, who uses them and who waits (`TaskManager`), with the
  residency policy in `residency.py`;
- `server.py`: starting the engine and serving vLLM's app extended with `serving_state.py` (state on the app),
  `admin_routes.py` (the task admin routes) and `middleware.py` (API key, task selection, body rewriting, over
  the ASGI plumbing in `asgi.py`);
- `metrics.py`: per-task counters; `engine.py`: starting vLLM's engine, its KV cache memory on CPU.
- `replicas.py`: `serve --replicas`, N servers behind one endpoint on Ray Serve, with its ingress (`ingress.py`)
  and the replicas' directory (`replica_directory.py`).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

from expert_hub.errors import InvalidInputError
from expert_hub.models import ModelSummary
from expert_hub.registry import Registry, validate_task_name

from .bank import BankSettings
from .config import ServeConfig
from .served_tasks import Task, adapter_task, check_base_fingerprint


def resolve_tasks(
    base: str, model: ModelSummary, specs: list[str], all_tasks: bool, registry: Registry
) -> dict[str, Task]:
    """Tasks by name from `law`, `law@3` (registry) or `law=DIR` (an adapter directory), then, with `all_tasks`,
    every other task registered for `base` (its newest version).

    Each is checked against the served model from its headers (experts, shapes, routing profile); an adapter
    directory's weights are read now (finite values) and named tasks' base fingerprints compared. A registry task's
    bytes are hashed by the worker at its first load, from the bytes it loads, so start-up reads no task's weights
    and does not grow with the registry; a task that fails then is refused with a 422 and dropped.
    """
    tasks: dict[str, Task] = {}
    for spec in specs:
        name, _, directory = spec.partition("=")
        if directory:
            task = adapter_task(validate_task_name(name), Path(directory), model)
        else:
            task = _registry_task(registry, registry.resolve(name, base), model)
        if task.name in tasks:
            raise InvalidInputError(f"task {task.name} is given twice")
        check_base_fingerprint(base, task)
        tasks[task.name] = task
    if all_tasks:
        newest = {entry.task: entry for entry in registry.entries(base)}  # oldest first: the newest wins
        for name in sorted(newest.keys() - tasks.keys()):
            tasks[name] = _registry_task(registry, newest[name], model)
    return tasks


def _registry_task(registry: Registry, entry, model: ModelSummary) -> Task:
    """A registry task from its manifest (checked against the entry) and headers; its weights are not read."""
    return adapter_task(entry.task, registry.object_path(entry), model, entry.version, registry.file_hashes(entry))


def bank_rows(tasks: dict[str, Task], num_experts: int, max_resident: int | None = None) -> int:
    """Default extra expert rows per layer: all of `tasks` (any `max_resident` of them, when given) fit at once,
    and at least E/4 (room for a task added at run time)."""
    counts: dict[int, list[int]] = {}
    for task in tasks.values():
        for layer, count in task.experts_per_layer.items():
            counts.setdefault(layer, []).append(count)
    needed = max((sum(sorted(layer, reverse=True)[:max_resident]) for layer in counts.values()), default=0)
    return max(needed, math.ceil(num_experts / 4))


def tasks_in_bank(tasks: dict[str, Task], rows: int | None) -> int:
    """About how many of `tasks` a bank of `rows` rows per layer holds at once: the rows over a typical task's rows
    in its largest layer; all of them without `rows` (the default bank makes room for every task when memory
    allows); `TASKS_WITHOUT_A_HINT` when none is named."""
    if not tasks:
        return TASKS_WITHOUT_A_HINT
    if not rows:
        return len(tasks)
    typical = sorted(max(task.experts_per_layer.values(), default=1) for task in tasks.values())[len(tasks) // 2]
    return max(1, min(len(tasks), rows // max(typical, 1)))


TASKS_WITHOUT_A_HINT = 8  # `tasks_in_bank` with no task named at start (tasks added or pulled at run time)
BANK_MEMORY_SHARE = 1 / 8  # of the device's free memory, at most, for the default bank
HOST_TIER_MEMORY_SHARE = 1 / 8  # of the memory available at start, for the default host-memory tier


def run_server(
    config: ServeConfig, model: ModelSummary, tasks: dict[str, Task], preload: list[str], registry: Registry
) -> None:
    """Start vLLM with the expert bank, load the `preload` tasks that fit, and serve until interrupted.

    The bank is `expert_bank_rows` rows per MoE layer, or as many as `expert_bank_gb` GiB (per GPU, over all MoE
    layers) holds, or by default room for every task (`bank_rows`) within an eighth of the device's free memory.
    `api_key` guards every route but `/health` (and `/metrics` unless `public_metrics`).
    """
    from . import vllm_contract as vllm

    vllm.check_vllm_version()
    import uvloop

    from .engine import cpu_float32_mla_backend, cpu_rotary_workaround
    from .server import serve
    from .worker import ExpertBankWorker

    if model.expert_biases:
        raise InvalidInputError(
            f"{model.family} experts have biases, which the expert bank does not hold yet: "
            "serve each task's merged checkpoint with vLLM instead"
        )
    base, vllm_argv = config.base, config.vllm_argv()
    assert base is not None  # the command resolved it (`--base`, else the demo base)
    worker_extension = f"{ExpertBankWorker.__module__}.{ExpertBankWorker.__name__}"
    argv = ["--model", base, "--worker-extension-cls", worker_extension, *vllm_argv, *cpu_rotary_workaround(vllm_argv)]
    argv += [*cpu_float32_mla_backend(base, vllm_argv), *_training_chat_template(base, vllm_argv)]
    args = vllm.parse_server_args(argv, prog="expert-hub serve")
    os.environ.update(_bank_settings(model, tasks, config, vllm.tensor_parallel_size(args)).to_env())
    uvloop.run(serve(args, config, tasks, preload, registry, model))


def _training_chat_template(base: str, vllm_argv: list[str]) -> list[str]:
    """`--chat-template` in the training format for a base whose tokenizer has no template (the demo base) and a
    server given none: chat requests then run on the prompts training formats (vLLM refuses chat otherwise)."""
    from expert_hub.data import REFERENCE_CHAT_TEMPLATE
    from expert_hub.models import load_tokenizer

    given = any(arg == "--chat-template" or arg.startswith("--chat-template=") for arg in vllm_argv)
    if given or getattr(load_tokenizer(base), "chat_template", None):
        return []
    return ["--chat-template", REFERENCE_CHAT_TEMPLATE]


def _bank_settings(model: ModelSummary, tasks: dict[str, Task], config: ServeConfig, ranks: int) -> BankSettings:
    """`expert_bank_gb` split evenly over the MoE layers, else `expert_bank_rows`, else room for the tasks within
    `BANK_MEMORY_SHARE` of the device's free memory; the host-memory tier as given, else `HOST_TIER_MEMORY_SHARE` of
    the memory available now, split between the `ranks` (each keeps its slice of every task)."""
    import psutil

    from .engine import free_device_memory

    layers, cap = len(model.moe_layers), config.max_resident_tasks
    available = psutil.virtual_memory().available
    cache_gb = config.task_cache_gb
    cache = int(cache_gb * 2**30) if cache_gb is not None else int(available * HOST_TIER_MEMORY_SHARE)
    if config.expert_bank_gb:
        bank = BankSettings(None, int(config.expert_bank_gb * 2**30 / layers), cap, layers)
    elif config.expert_bank_rows:
        bank = BankSettings(config.expert_bank_rows, None, cap, layers)
    else:
        wanted = bank_rows(tasks, model.num_experts, cap)
        share = int(free_device_memory() * BANK_MEMORY_SHARE / layers)
        bank = BankSettings(wanted, share, cap, layers)
    return replace(bank, host_cache_bytes=cache // ranks)
