"""`serve`: the base model and tasks' experts on vLLM behind an OpenAI-compatible API."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from .app import DType, app, base_or_demo, console


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    base: Annotated[
        str | None,
        typer.Option(help="Base MoE model (directory or Hub id) served to every task [default: the demo base]."),
    ] = None,
    tasks: Annotated[
        str, typer.Option(help="Comma-separated tasks: registry names (law, law@3) or NAME=ADAPTER_DIR.")
    ] = "",
    all_tasks: Annotated[bool, typer.Option("--all-tasks", help="Serve every registered task of this base.")] = False,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="EXPERT_HUB_API_KEY", help="Require this key (Authorization: Bearer) on every route but /health."
        ),
    ] = None,
    dtype: Annotated[DType, typer.Option(help="Weights dtype.")] = DType.auto,
    max_model_len: Annotated[int | None, typer.Option(help="Longest prompt + completion.")] = None,
    max_resident_tasks: Annotated[
        int | None,
        typer.Option(
            min=1, help="At most this many tasks resident at once [default: as many as the bank's rows hold]."
        ),
    ] = None,
    expert_bank_rows: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Extra expert rows per MoE layer [default: room for every served task at once, within an eighth of "
            "the device's free memory].",
        ),
    ] = None,
    expert_bank_gb: Annotated[
        float | None, typer.Option(help="Size the expert bank in GiB per GPU instead (all MoE layers together).")
    ] = None,
    task_cache_gb: Annotated[
        float | None,
        typer.Option(help="Host memory (GiB) keeping evicted tasks' rows for fast reloads [default: 1/8 of free RAM]."),
    ] = None,
    task_wait_timeout: Annotated[
        float, typer.Option(help="Seconds a request waits for its task to be loaded before a 503.")
    ] = 60.0,
    allow_pull: Annotated[
        list[str] | None,
        typer.Option(
            metavar="'ORG/*'",
            help="Let a request name a Hub repo matching this pattern (repeatable): pulled, verified and served.",
        ),
    ] = None,
    max_waiting_requests: Annotated[
        int, typer.Option(min=1, help="Requests that may wait for their tasks at once; more get a 503.")
    ] = 1024,
    kv_cache_gb: Annotated[
        float | None,
        typer.Option(
            help="KV cache memory in GiB (default on CPU: what --max-model-len and the batch need, at most half the free memory)."
        ),
    ] = None,
    public_metrics: Annotated[
        bool, typer.Option("--public-metrics", help="Serve /metrics without the API key.")
    ] = False,
    replicas: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Run this many servers behind the one endpoint on Ray Serve, each request sent to a replica that "
            "holds its task (needs expert-hub[ray]).",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Join this Ray cluster (e.g. auto) instead of starting Ray on this machine; with --replicas."
        ),
    ] = None,
) -> None:
    """Serve the base model and tasks' experts on vLLM behind an OpenAI-compatible API.

    Any other option goes to vLLM's server (e.g. --gpu-memory-utilization, --enable-prefix-caching).
    """
    from expert_hub.errors import InvalidInputError
    from expert_hub.models import describe_model
    from expert_hub.registry import Registry
    from expert_hub.serving import HubOptions, resolve_tasks, run_server

    for flag, value in (
        ("--expert-bank-gb", expert_bank_gb),
        ("--kv-cache-gb", kv_cache_gb),
        ("--task-wait-timeout", task_wait_timeout),
    ):
        if value is not None and not value > 0:
            raise InvalidInputError(f"{flag} must be positive, got {value}")
    if task_cache_gb is not None and not task_cache_gb >= 0:
        raise InvalidInputError(f"--task-cache-gb must be 0 or more, got {task_cache_gb}")
    patterns = tuple(_pull_patterns(allow_pull or []))
    if ray_address and not replicas:
        raise InvalidInputError("--ray-address runs replicas: give --replicas N too")
    if expert_bank_rows and expert_bank_gb:
        raise InvalidInputError("give --expert-bank-rows or --expert-bank-gb, not both")
    base = base_or_demo(base)
    registry = Registry()
    model = describe_model(base)
    named = [t.strip() for t in tasks.split(",") if t.strip()]
    served = resolve_tasks(base, model, named, all_tasks, registry)
    argv = ["--host", host, "--port", str(port), "--dtype", dtype.value, *ctx.args]
    argv += ["--max-model-len", str(max_model_len)] if max_model_len else []
    argv += ["--kv-cache-memory-bytes", str(int(kv_cache_gb * 2**30))] if kv_cache_gb else []
    shown = ", ".join(list(served)[:20]) + (f" and {len(served) - 20} more" if len(served) > 20 else "")
    console.print(f"Serving {base} with {len(served)} task(s): {shown or '-'}")
    options = HubOptions(
        max_resident=max_resident_tasks,
        extra_rows=expert_bank_rows,
        bank_gb=expert_bank_gb,
        wait_timeout=task_wait_timeout,
        max_waiting=max_waiting_requests,
        task_cache_gb=task_cache_gb,
        allow_pull=patterns,
    )
    if replicas:
        return _run_replicas(ctx, base, argv, replicas, ray_address, served, host, port, api_key, public_metrics)
    preload = list(served)[: len(named)]  # the tasks named, in order; --all-tasks' others load on first use
    run_server(base, model, served, preload, registry, argv, options, api_key, public_metrics)


def _pull_patterns(patterns: list[str]) -> list[str]:
    """`--allow-pull` patterns, each `ORG/NAME` or `ORG/*`: an organisation must be named (no `*` or `*/*`)."""
    from expert_hub.errors import InvalidInputError

    for pattern in patterns:
        organisation, slash, _ = pattern.partition("/")
        if not slash or not organisation or any(character in organisation for character in "*?["):
            raise InvalidInputError(f"--allow-pull {pattern!r}: name an organisation, e.g. 'acme/*' or 'acme/law'")
    return patterns


# Where each replica's server listens, and its key, are the replica's own; Ray's options are the front's.
_FRONT_OPTIONS = frozenset({"host", "port", "api_key", "public_metrics", "replicas", "ray_address"})


def _run_replicas(
    ctx,
    base: str,
    vllm_argv: list[str],
    replicas: int,
    ray_address,
    served: dict,
    host: str,
    port: int,
    api_key,
    public_metrics,
) -> None:
    """`serve --replicas N`: every replica runs `serve` with this command's other options (`replicas.py`)."""
    from expert_hub.errors import InvalidInputError
    from expert_hub.serving import tasks_in_bank
    from expert_hub.serving.replicas import ReplicaSettings, private_ray_token, run_replicas

    if ray_address is None:
        private_ray_token()  # before vLLM's configuration (next) imports Ray

    argv: list[str] = []
    params = ctx.params | _absolute_paths(ctx.params["base"], ctx.params["tasks"])
    for param in ctx.command.params:
        value = params[param.name]
        if param.name in _FRONT_OPTIONS or value in (None, (), []) or value == param.default:
            continue
        flag = param.opts[0]
        if isinstance(value, bool):
            argv.append(flag)
        else:
            argv += [
                item
                for each in (value if isinstance(value, list | tuple) else [value])
                for item in (flag, str(getattr(each, "value", each)))
            ]
    argv += ctx.args
    gpus, batch, ranks = _replica_shape(base, vllm_argv)
    split_cpus = ray_address is None and gpus == 0  # one CPU machine: each replica on its own cores
    if split_cpus and replicas * ranks > len(cores := os.sched_getaffinity(0)):
        raise InvalidInputError(
            f"--replicas {replicas} with {ranks} rank(s) each needs {replicas * ranks} CPU cores and {len(cores)} are "
            "available: give fewer --replicas or a smaller --tensor-parallel-size"
        )
    settings = ReplicaSettings(
        tuple(argv),
        tasks_per_replica=ctx.params["max_resident_tasks"] or tasks_in_bank(served, ctx.params["expert_bank_rows"]),
        listen_on_node_address=ray_address is not None,
        split_cpus=split_cpus,
        ranks=ranks,
        cwd=os.getcwd() if ray_address is None else None,
    )
    run_replicas(settings, replicas, gpus, batch, host, port, api_key, public_metrics, ray_address)


def _absolute_paths(base: str | None, tasks: str) -> dict[str, str | None]:
    """`--base` and the `NAME=DIR` tasks with local paths made absolute: the replicas run in Ray's directories."""
    from pathlib import Path

    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if Path(path).exists() else path

    specs = [spec.partition("=") for spec in tasks.split(",") if spec.strip()]
    return {
        "base": absolute(base) if base else base,
        "tasks": ",".join(name + equals + (absolute(directory) if equals else "") for name, equals, directory in specs),
    }


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
