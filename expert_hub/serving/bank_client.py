"""The front end's typed client for the bank's worker methods (`worker.ExpertBankWorker`, run by `collective_rpc`).

The method names are taken from the worker class itself, so they are written once; replies come back as the
worker's result types. Every worker (each tensor-parallel rank) answers, and their answers must agree: ranks that
loaded a task into different rows, or one that loaded it while another did not, would serve wrong tokens. A
worker's unexpected exception arrives as vLLM's own exception (whose text carries the worker's message:
`vllm_contract.worker_error_message`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InternalError
from . import vllm_contract as vllm
from .worker import BankInfo, ExpertBankWorker, LayoutResult, LoadResult, StageResult

if TYPE_CHECKING:
    from .vllm_contract import EngineClient


class WorkersDisagreeError(InternalError):
    """Tensor-parallel ranks answered one bank call differently (a bug or a failing device, never bad input)."""


class BankClient:
    """The expert bank of every worker of `engine`."""

    def __init__(self, engine: EngineClient):
        self.engine = engine

    async def load_task(
        self, key: str, directory: str, sha256: dict[str, str] | None = None, evict: Sequence[str] = ()
    ) -> LoadResult:
        """Evict `evict` and load on every rank. Where the ranks disagree or one fails, the task is unloaded from all
        of them before raising, so no rank keeps rows the others lack (and `evict` is evicted everywhere)."""
        method = ExpertBankWorker.expert_hub_load_task.__name__
        try:
            replies = await vllm.call_workers(self.engine, method, key, directory, sha256, list(evict))
            own = {  # what each rank may answer on its own: its time, and its tier (each keeps its own LRU)
                "seconds": max(reply["seconds"] for reply in replies),
                "source": next((r["source"] for r in replies if r["source"] == "disk"), replies[0]["source"]),
            }
            return LoadResult(**_agreed([reply | own for reply in replies], method))
        except Exception:
            with contextlib.suppress(Exception):  # a worker that died: the error being raised says so
                for unloaded in (*evict, key):
                    await self.unload_task(unloaded, keep=unloaded != key)
            raise

    async def stage_tasks(self, tasks: list[tuple[str, str, dict[str, str] | None]]) -> list[StageResult]:
        """Start staging tasks (key, directory, sha256) into every rank's host-memory tier, in order, or ask how far
        each got: for each, the least advanced rank answers (a refusal first)."""
        replies = await vllm.call_workers(self.engine, ExpertBankWorker.expert_hub_stage_tasks.__name__, tasks)
        order = ("refused", "staging", "off", "staged")
        return [
            StageResult(**min(answers, key=lambda reply: order.index(reply["status"]))) for answers in zip(*replies)
        ]

    async def unload_task(self, key: str, keep: bool = False) -> bool:
        """True when any rank held the task (after which none does); `keep`: an eviction, whose rows each rank keeps
        in its host-memory tier."""
        return any(await vllm.call_workers(self.engine, ExpertBankWorker.expert_hub_unload_task.__name__, key, keep))

    async def bank_info(self) -> BankInfo:
        """One rank's bank (every rank holds the same rows, each its shard of every expert)."""
        replies = await vllm.call_workers(self.engine, ExpertBankWorker.expert_hub_bank_info.__name__)
        tiers = [{key: reply[key] for key in _HOST_CACHE_FIELDS} for reply in replies]
        rows = [{key: value for key, value in reply.items() if key not in _HOST_CACHE_FIELDS} for reply in replies]
        info = _agreed(rows, "bank_info")  # the bank's rows: the same on every rank
        return info | {  # each rank's host-memory tier fills on its own: the server's in all
            "host_cache_tasks": min(tier["host_cache_tasks"] for tier in tiers),
            "host_cache_bytes": sum(tier["host_cache_bytes"] for tier in tiers),
            "host_cache_max_bytes": sum(tier["host_cache_max_bytes"] for tier in tiers),
        }

    async def check_layout(self) -> LayoutResult:
        """The first rank's verdict that is not "ok", else "ok": each rank checks its own shard."""
        replies = await vllm.call_workers(self.engine, ExpertBankWorker.expert_hub_check_layout.__name__)
        return LayoutResult(**next((reply for reply in replies if reply["status"] != "ok"), replies[0]))


_HOST_CACHE_FIELDS = ("host_cache_tasks", "host_cache_bytes", "host_cache_max_bytes")


def _agreed(replies: list[Any], call: str) -> Any:
    if any(reply != replies[0] for reply in replies[1:]):
        raise WorkersDisagreeError(f"the tensor-parallel ranks answered {call} differently: {replies}")
    return replies[0]
