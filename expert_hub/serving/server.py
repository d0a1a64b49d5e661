"""`expert-hub serve`: vLLM's OpenAI-compatible server, plus tasks.

vLLM's own server handles generation, streaming, `/health` and `/metrics`. `serve` starts the engine with the bank
worker, loads the initial tasks, and serves vLLM's app extended with:
- the serving state (`serving_state.ServingState`: task manager, base names, API keys) on `app.state`;
- the task admin routes (`admin_routes.py`: `GET /v1/tasks`, `POST` / `DELETE /v1/tasks/{name}`);
- the `TaskRouting` middleware (`middleware.py`), outermost: the API key, task selection, pinning, body rewriting;
- per-task token counters around the engine's `generate` (`metrics.py`).
"""

from __future__ import annotations

import logging
from argparse import Namespace
from typing import TYPE_CHECKING, Any

from expert_hub.errors import InvalidInputError
from expert_hub.models import ModelSummary
from expert_hub.registry import Registry

from . import vllm_contract as vllm
from .admin_routes import admin_router
from .auto import AutoRouting
from .config import ServeConfig
from .engine import start_engine
from .manager import TaskManager
from .metrics import count_tokens
from .middleware import TaskRouting
from .served_tasks import Task
from .serving_state import ApiKeys, ServingState

if TYPE_CHECKING:
    from .vllm_contract import EngineClient

logger = logging.getLogger(__name__)


async def serve(
    args: Namespace,
    config: ServeConfig,
    tasks: dict[str, Task],
    preload: list[str],
    registry: Registry,
    model: ModelSummary,
) -> None:
    """Start the engine with the bank worker, load the `preload` tasks that fit, then serve HTTP until stopped."""
    assert config.base is not None  # `run_server` serves a resolved base
    base_names = tuple(args.served_model_name or [args.model])
    api_keys = [config.api_key] if config.api_key else []
    open_routes = frozenset({"/health", "/metrics"} if config.public_metrics else {"/health"})
    keys = ApiKeys(vllm.api_keys(api_keys), open_routes)
    args.middleware = [*args.middleware, f"{TaskRouting.__module__}.{TaskRouting.__name__}"]  # outermost: key first
    listen_address, sock = vllm.setup_server(args)
    async with start_engine(args) as engine:
        manager = TaskManager(
            engine,
            dict(tasks),
            model,
            registry,
            config.base,
            base_names[0],
            max_resident=config.max_resident_tasks,
            wait_timeout=config.task_wait_timeout,
            max_waiting=config.max_waiting_requests,
            allow_pull=config.allow_pull,
        )
        engine.generate = count_tokens(engine.generate, manager.task_of_key)
        await _prepare_bank(manager, preload)
        state = ServingState(
            manager, base_names, keys, _auto_routing(config.base, model, engine, vllm.chat_template(args))
        )

        def extend_app(app) -> None:
            state.install(app)
            app.include_router(admin_router)

        shutdown = await vllm.build_and_serve(engine, listen_address, sock, args, extend_app)  # TLS and all
    await shutdown


def _auto_routing(base: str, model: ModelSummary, engine: EngineClient, chat_template: str | None) -> AutoRouting:
    """The router for `"model": "auto"`, rendering chats as vLLM does; with a CPU engine it runs as the engine does
    (see `auto`)."""
    as_the_engine: dict[str, Any] = {"threads": 1, "dtype": vllm.served_dtype(engine)} if vllm.is_cpu() else {}
    return AutoRouting(base, model.moe_layers, chat_template=chat_template, **as_the_engine)


async def _prepare_bank(manager: TaskManager, preload: list[str]) -> None:
    """Refuse a bank that holds no expert or a kernel layout it cannot write, then load the tasks named at start
    while they fit (the others load when their first request comes)."""
    bank = await manager.bank()
    if not bank["rows_per_layer"]:
        raise InvalidInputError(
            f"the expert bank holds no expert: one expert row in every MoE layer takes "
            f"{bank['bytes_per_row'] / 2**20:.1f} MiB; give a larger --expert-bank-gb"
        )
    if not await manager.check_layout():
        logger.warning("the base checkpoint has no per-expert tensors to check the bank's weight layout with")
    await manager.preload(preload)
