"""`serve`: the base model and tasks' experts on vLLM behind an OpenAI-compatible API."""

from __future__ import annotations

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
        str | None, typer.Option(help="Require this key (Authorization: Bearer) on every route but /health.")
    ] = None,
    dtype: Annotated[DType, typer.Option(help="Weights dtype.")] = DType.auto,
    max_model_len: Annotated[int | None, typer.Option(help="Longest prompt + completion.")] = None,
    max_resident_tasks: Annotated[
        int, typer.Option(min=1, help="Tasks whose experts stay in the bank at once (LRU eviction).")
    ] = 4,
    expert_bank_rows: Annotated[
        int | None,
        typer.Option(
            min=1, help="Extra expert rows per MoE layer (default: room for --max-resident-tasks of the given tasks)."
        ),
    ] = None,
    expert_bank_gb: Annotated[
        float | None, typer.Option(help="Size the expert bank in GiB per GPU instead (all MoE layers together).")
    ] = None,
    kv_cache_gb: Annotated[
        float | None,
        typer.Option(
            help="KV cache memory in GiB (default on CPU: what --max-model-len and the batch need, at most half the free memory)."
        ),
    ] = None,
    public_metrics: Annotated[
        bool, typer.Option("--public-metrics", help="Serve /metrics without the API key.")
    ] = False,
) -> None:
    """Serve the base model and tasks' experts on vLLM behind an OpenAI-compatible API.

    Any other option goes to vLLM's server (e.g. --gpu-memory-utilization, --enable-prefix-caching).
    """
    from expert_hub.errors import InvalidInputError
    from expert_hub.models import describe_model
    from expert_hub.registry import Registry
    from expert_hub.serving import resolve_tasks, run_server

    for flag, value in (("--expert-bank-gb", expert_bank_gb), ("--kv-cache-gb", kv_cache_gb)):
        if value is not None and not value > 0:
            raise InvalidInputError(f"{flag} must be positive, got {value}")
    if expert_bank_rows and expert_bank_gb:
        raise InvalidInputError("give --expert-bank-rows or --expert-bank-gb, not both")
    base = base_or_demo(base)
    registry = Registry()
    model = describe_model(base)
    served = resolve_tasks(base, model, [t.strip() for t in tasks.split(",") if t.strip()], all_tasks, registry)
    argv = ["--host", host, "--port", str(port), "--dtype", dtype.value, *ctx.args]
    argv += ["--max-model-len", str(max_model_len)] if max_model_len else []
    argv += ["--kv-cache-memory-bytes", str(int(kv_cache_gb * 2**30))] if kv_cache_gb else []
    console.print(f"Serving {base} with {len(served)} task(s): {', '.join(served) or '-'}")
    run_server(
        base,
        model,
        served,
        max_resident_tasks,
        registry,
        argv,
        expert_bank_rows,
        expert_bank_gb,
        api_key,
        public_metrics,
    )
