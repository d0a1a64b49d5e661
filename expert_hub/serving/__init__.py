"""Serving task experts on vLLM: one shared base model, each request with its task's experts.

`run_server` resolves the tasks, sizes the expert bank, starts vLLM's OpenAI server with the bank plugin and
worker extension, and serves until stopped. See `bank.py` (inside vLLM), `worker.py` (task loading),
`tasks.py` (residency) and `server.py` (HTTP).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from expert_hub.adapter import AdapterHeader, checkpoint_fingerprint
from expert_hub.errors import InvalidInputError

from .bank import BANK_BYTES_ENV, BANK_ROWS_ENV
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
    """Default extra expert rows per layer: any `max_resident` of `tasks` fit at once, and at least E/4 (room for a
    task added at run time)."""
    counts: dict[int, list[int]] = {}
    for task in tasks.values():
        for layer, count in task.experts_per_layer.items():
            counts.setdefault(layer, []).append(count)
    needed = max((sum(sorted(layer, reverse=True)[:max_resident]) for layer in counts.values()), default=0)
    return max(needed, math.ceil(num_experts / 4))


def _cpu_rotary_workaround(vllm_argv: list[str]) -> list[str]:
    """On CPU, run rotary embeddings in PyTorch rather than vLLM's C++ kernel.

    vLLM 0.32's CPU rotary kernel rotates queries wrongly in GPT-J (interleaved) style when the query has more heads
    than the key and the batch has more than one token, which is DeepSeek's MLA: every request's tokens then depend
    on what else shares its batch (with `--enforce-eager`; compiled runs default to the PyTorch path). A
    `--compilation-config` given by the user wins.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or any(a.startswith(("--compilation-config", "-cc")) for a in vllm_argv):
        return []
    return ["--compilation-config", json.dumps({"custom_ops": ["-rotary_embedding"]})]


def run_server(base: str, tasks: dict[str, Task], max_resident: int, registry, vllm_argv: list[str],
               extra_rows: int | None = None, bank_gb: float | None = None) -> None:
    """Start vLLM with the expert bank and serve until interrupted.

    The bank is `extra_rows` rows per MoE layer, or as many as `bank_gb` GiB (per GPU, over all MoE layers) holds,
    or by default room for `max_resident` of the given tasks (`bank_rows`).
    """
    import uvloop
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from expert_hub.models import describe_model

    from .server import serve

    summary = describe_model(base)
    if summary.expert_biases:
        raise InvalidInputError(f"{summary.family} experts have biases, which the expert bank does not hold yet: "
                                "serve each task's merged checkpoint with vLLM instead")
    for variable in (BANK_ROWS_ENV, BANK_BYTES_ENV):
        os.environ.pop(variable, None)
    if bank_gb:
        os.environ[BANK_BYTES_ENV] = str(int(bank_gb * 2**30 / len(summary.moe_layers)))
    else:
        os.environ[BANK_ROWS_ENV] = str(extra_rows or bank_rows(tasks, summary.num_experts, max_resident))
    os.environ["EXPERT_HUB_MAX_TASKS"] = str(max_resident)
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the bank tags tokens in the V1 runner's input preparation
    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="expert-hub serve"))
    argv = ["--model", base, "--worker-extension-cls", WORKER_EXTENSION, *vllm_argv, *_cpu_rotary_workaround(vllm_argv)]
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    uvloop.run(serve(args, tasks, max_resident, registry, base))
