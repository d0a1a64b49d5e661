"""`serve`: the base model and tasks' experts on vLLM behind an OpenAI-compatible API."""

from __future__ import annotations

import os
from dataclasses import replace

import typer

from expert_hub.serving.config import ServeConfig

from .app import app, base_or_demo, console
from .config_options import config_values, with_config_options


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@with_config_options(ServeConfig)
def serve(ctx: typer.Context, **settings) -> None:
    """Serve the base model and tasks' experts on vLLM behind an OpenAI-compatible API.

    Any other option goes to vLLM's server (e.g. --gpu-memory-utilization, --enable-prefix-caching).
    """
    from expert_hub.models import describe_model
    from expert_hub.registry import Registry
    from expert_hub.serving import resolve_tasks, run_server

    given = ServeConfig(**config_values(ServeConfig, settings), vllm_args=tuple(ctx.args))
    base = base_or_demo(given.base)
    config = replace(given, base=base)
    registry = Registry()
    model = describe_model(base)
    served = resolve_tasks(base, model, config.task_specs, config.all_tasks, registry)
    shown = ", ".join(list(served)[:20]) + (f" and {len(served) - 20} more" if len(served) > 20 else "")
    console.print(f"Serving {base} with {len(served)} task(s): {shown or '-'}")
    if config.replicas:
        return _run_replicas(given, config, base, config.replicas, served)
    preload = list(served)[: len(config.task_specs)]  # the tasks named, in order; --all-tasks' others load on first use
    run_server(config, model, served, preload, registry)


def _run_replicas(given: ServeConfig, config: ServeConfig, base: str, replicas: int, served: dict) -> None:
    """`serve --replicas N`: every replica runs `serve` with this command's other options, as given (`replicas.py`)."""
    from expert_hub.errors import InvalidInputError
    from expert_hub.serving import tasks_in_bank
    from expert_hub.serving.replicas import ReplicaSettings, private_ray_token, run_replicas

    if config.ray_address is None:
        private_ray_token()  # before vLLM's configuration (next) imports Ray
    gpus, batch, ranks = _replica_shape(base, config.vllm_argv())
    split_cpus = config.ray_address is None and gpus == 0  # one CPU machine: each replica on its own cores
    if split_cpus and replicas * ranks > len(cores := os.sched_getaffinity(0)):
        raise InvalidInputError(
            f"--replicas {replicas} with {ranks} rank(s) each needs {replicas * ranks} CPU cores and "
            f"{len(cores)} are available: give fewer --replicas or a smaller --tensor-parallel-size"
        )
    settings = ReplicaSettings(
        tuple(_with_absolute_paths(given).replica_argv()),
        tasks_per_replica=config.max_resident_tasks or tasks_in_bank(served, config.expert_bank_rows),
        listen_on_node_address=config.ray_address is not None,
        split_cpus=split_cpus,
        ranks=ranks,
        cwd=os.getcwd() if config.ray_address is None else None,
    )
    run_replicas(settings, config, gpus, batch)


def _with_absolute_paths(config: ServeConfig) -> ServeConfig:
    """`--base` and the `NAME=DIR` tasks with local paths made absolute: the replicas run in Ray's directories."""
    from pathlib import Path

    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if Path(path).exists() else path

    specs = [spec.partition("=") for spec in config.task_specs]
    tasks = ",".join(name + equals + (absolute(directory) if equals else "") for name, equals, directory in specs)
    return replace(config, base=absolute(config.base) if config.base else config.base, tasks=tasks)


def _replica_shape(base: str, vllm_argv: list[str]) -> tuple[int, int, int]:
    """Each replica's GPUs (none on CPU), the requests it takes before Ray Serve sends a task's next ones to another
    replica as well (its engine's batch, `--max-num-seqs`), and its tensor-parallel ranks, read as vLLM reads them;
    options vLLM refuses are refused here, in one line, before any replica starts."""
    from expert_hub.serving import vllm_contract as vllm
    from expert_hub.serving.engine import checked_engine_config

    args = vllm.parse_server_args(["--model", base, *vllm_argv], prog="expert-hub serve")
    checked_engine_config(args)
    ranks = vllm.tensor_parallel_size(args)
    return (0 if vllm.is_cpu() else ranks), args.max_num_seqs or DEFAULT_BATCH, ranks


DEFAULT_BATCH = 256  # vLLM's `--max-num-seqs` for its OpenAI server on most devices
