"""The front end's typed client for the bank's worker methods (`worker.ExpertBankWorker`, run by `collective_rpc`).

The method names are taken from the worker class itself, so they are written once; replies come back as the
worker's result types. A worker's unexpected exception arrives as vLLM's own exception (whose text carries the
worker's message: `vllm_contract.worker_error_message`).
"""

from __future__ import annotations

from . import vllm_contract as vllm
from .worker import BankInfo, ExpertBankWorker, LayoutResult, LoadResult


class BankClient:
    """The expert bank of every worker of `engine`, as the first worker reports it."""

    def __init__(self, engine):
        self.engine = engine

    async def load_task(self, key: str, directory: str, sha256: dict[str, str] | None = None) -> LoadResult:
        method = ExpertBankWorker.expert_hub_load_task.__name__
        reply = await vllm.call_workers(self.engine, method, key, directory, sha256)
        return LoadResult(**reply)

    async def unload_task(self, key: str) -> bool:
        return await vllm.call_workers(self.engine, ExpertBankWorker.expert_hub_unload_task.__name__, key)

    async def bank_info(self) -> BankInfo:
        return await vllm.call_workers(self.engine, ExpertBankWorker.expert_hub_bank_info.__name__)

    async def check_layout(self) -> LayoutResult:
        return LayoutResult(**await vllm.call_workers(self.engine, ExpertBankWorker.expert_hub_check_layout.__name__))
