"""Serving task experts on vLLM: one shared base model, each request with its task's experts.

`run_server` resolves the tasks, sizes the expert bank, starts vLLM's OpenAI server with the bank plugin and
worker extension, and serves until stopped. See `bank.py` (inside vLLM), `worker.py` (task loading),
`tasks.py` (residency) and `server.py` (HTTP).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from expert_hub.adapter import AdapterHeader, checkpoint_fingerprint
from expert_hub.errors import InvalidInputError

from .tasks import Task, adapter_task

WORKER_EXTENSION = "expert_hub.serving.worker.ExpertBankWorker"


def resolve_tasks(base: str, specs: list[str], all_tasks: bool, registry) -> dict[str, Task]:
    """Tasks by name from `law`, `law@3` (registry, verified) or `law=DIR` (an adapter directory).

    Each is checked against the base model's weights (the adapter's recorded fingerprint), when it has one.
    """
    if all_tasks:
        specs = [*specs, *sorted({entry.task for entry in registry.entries(base)})]
    tasks: dict[str, Task] = {}
    for spec in specs:
        name, _, directory = spec.partition("=")
        if directory:
            task = adapter_task(name, Path(directory))
        else:
            entry = registry.resolve(name, base)
            task = adapter_task(name.partition("@")[0], registry.verify(entry))
        _check_fingerprint(base, task)
        tasks[task.name] = task
    return tasks


def _check_fingerprint(base: str, task: Task) -> None:
    header = AdapterHeader.read(task.directory)
    expected = header.metadata.base_fingerprint
    if expected and (actual := checkpoint_fingerprint(base, header.selection)) not in (None, expected):
        raise InvalidInputError(f"task {task.name} was trained from other base weights than {base} "
                                f"(fingerprint {actual[:12]} != {expected[:12]})")


def bank_rows(tasks: dict[str, Task], num_experts: int, max_resident: int) -> int:
    """Extra expert rows per layer: room for `max_resident` tasks of the largest kind seen (at least E/4 each)."""
    largest = max((max(map(len, AdapterHeader.read(t.directory).selection.experts.values()), default=0)
                   for t in tasks.values()), default=0)
    return max_resident * max(largest, math.ceil(num_experts / 4))


def run_server(base: str, tasks: dict[str, Task], max_resident: int, registry, vllm_argv: list[str],
               extra_rows: int | None = None) -> None:
    """Start vLLM with the expert bank and serve until interrupted."""
    import uvloop
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from expert_hub.models import describe_model

    from .server import serve

    num_experts = describe_model(base).num_experts
    os.environ["EXPERT_HUB_BANK_ROWS"] = str(extra_rows or bank_rows(tasks, num_experts, max_resident))
    os.environ["EXPERT_HUB_MAX_TASKS"] = str(max_resident)
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the bank tags tokens in the V1 runner's input preparation
    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="expert-hub serve"))
    args = parser.parse_args(["--model", base, "--worker-extension-cls", WORKER_EXTENSION, *vllm_argv])
    validate_parsed_serve_args(args)
    uvloop.run(serve(args, tasks, max_resident, registry, base))
