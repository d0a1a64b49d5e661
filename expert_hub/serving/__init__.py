"""Serving task experts on vLLM: one shared base model, each request with its task's experts.

`run_server` checks the installed vLLM, resolves the tasks, sizes the expert bank, starts vLLM's OpenAI server with
the bank plugin and worker extension, and serves until stopped. The modules:
- `vllm_contract.py`: every vLLM internal expert-hub uses, resolved in one place, and the supported vLLM range;
- `bank.py`: the bank inside vLLM's processes (plugin entry point, `BankSettings`, per-token task rows);
- `worker.py`: task loading in the worker process, returning `LoadResult` / `LayoutResult`;
- `bank_client.py`: the front end's typed client for those worker methods;
- `tasks.py`: which tasks are servable and resident, and who is using them (`TaskManager`);
- `server.py`: starting the engine and serving vLLM's app extended with `serving_state.py` (state on the app),
  `routes.py` (the task admin routes) and `middleware.py` (API key, task selection, body rewriting);
- `metrics.py`: per-task counters; `engine.py`: starting vLLM's engine, its KV cache memory on CPU.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from expert_hub.adapter import AdapterHeader, checkpoint_fingerprint
from expert_hub.errors import InvalidInputError
from expert_hub.models import ModelSummary
from expert_hub.registry import validate_task_name

from .bank import BankSettings
from .tasks import Task, adapter_task


def resolve_tasks(base: str, model: ModelSummary, specs: list[str], all_tasks: bool, registry) -> dict[str, Task]:
    """Tasks by name from `law`, `law@3` (registry, verified) or `law=DIR` (an adapter directory).

    Each is checked against the served model (experts, shapes, finite weights) and against its weights (the
    adapter's recorded fingerprint), when it has one.
    """
    if all_tasks:
        named = {spec.partition("=")[0].partition("@")[0] for spec in specs}
        specs = [*specs, *sorted({entry.task for entry in registry.entries(base)} - named)]
    tasks: dict[str, Task] = {}
    for spec in specs:
        name, _, directory = spec.partition("=")
        if directory:
            task = adapter_task(validate_task_name(name), Path(directory), model)
        else:
            entry = registry.resolve(name, base)
            hashes = registry.file_hashes(entry)  # verified now to refuse a damaged task at start, and at each load
            task = adapter_task(entry.task, registry.verify(entry), model, entry.version, hashes)
        if task.name in tasks:
            raise InvalidInputError(f"task {task.name} is given twice")
        _check_fingerprint(base, task)
        tasks[task.name] = task
    return tasks


def _check_fingerprint(base: str, task: Task) -> None:
    header = AdapterHeader.read(task.directory)
    expected = header.metadata.base_fingerprint
    if expected and (actual := checkpoint_fingerprint(base, header.selection)) not in (None, expected):
        raise InvalidInputError(
            f"task {task.name} was trained from other base weights than {base} "
            f"(fingerprint {actual[:12]} != {expected[:12]})"
        )


def bank_rows(tasks: dict[str, Task], num_experts: int, max_resident: int) -> int:
    """Default extra expert rows per layer: any `max_resident` of `tasks` fit at once, and at least E/4 (room for a
    task added at run time)."""
    counts: dict[int, list[int]] = {}
    for task in tasks.values():
        for layer, count in task.experts_per_layer.items():
            counts.setdefault(layer, []).append(count)
    needed = max((sum(sorted(layer, reverse=True)[:max_resident]) for layer in counts.values()), default=0)
    return max(needed, math.ceil(num_experts / 4))


def run_server(
    base: str,
    model: ModelSummary,
    tasks: dict[str, Task],
    max_resident: int,
    registry,
    vllm_argv: list[str],
    extra_rows: int | None = None,
    bank_gb: float | None = None,
    api_key: str | None = None,
    public_metrics: bool = False,
) -> None:
    """Start vLLM with the expert bank and serve until interrupted.

    The bank is `extra_rows` rows per MoE layer, or as many as `bank_gb` GiB (per GPU, over all MoE layers) holds,
    or by default room for `max_resident` of the given tasks (`bank_rows`). `api_key` guards every route but
    `/health` (and `/metrics` unless `public_metrics`).
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
    os.environ.update(_bank_settings(model, tasks, max_resident, extra_rows, bank_gb).to_env())
    worker_extension = f"{ExpertBankWorker.__module__}.{ExpertBankWorker.__name__}"
    argv = ["--model", base, "--worker-extension-cls", worker_extension, *vllm_argv, *cpu_rotary_workaround(vllm_argv)]
    argv += [*cpu_float32_mla_backend(base, vllm_argv), *_training_chat_template(base, vllm_argv)]
    args = vllm.parse_server_args(argv, prog="expert-hub serve")
    uvloop.run(serve(args, tasks, max_resident, registry, base, model, [api_key] if api_key else [], public_metrics))


def _training_chat_template(base: str, vllm_argv: list[str]) -> list[str]:
    """`--chat-template` in the training format for a base whose tokenizer has no template (the demo base) and a
    server given none: chat requests then run on the prompts training formats (vLLM refuses chat otherwise)."""
    from expert_hub.data import REFERENCE_CHAT_TEMPLATE
    from expert_hub.models import load_tokenizer

    given = any(arg == "--chat-template" or arg.startswith("--chat-template=") for arg in vllm_argv)
    if given or getattr(load_tokenizer(base), "chat_template", None):
        return []
    return ["--chat-template", REFERENCE_CHAT_TEMPLATE]


def _bank_settings(
    model: ModelSummary, tasks: dict[str, Task], max_resident: int, extra_rows: int | None, bank_gb: float | None
) -> BankSettings:
    """`bank_gb` split evenly over the MoE layers, else `extra_rows`, else room for `max_resident` of `tasks`."""
    if bank_gb:
        return BankSettings(None, int(bank_gb * 2**30 / len(model.moe_layers)), max_resident)
    return BankSettings(extra_rows or bank_rows(tasks, model.num_experts, max_resident), None, max_resident)
