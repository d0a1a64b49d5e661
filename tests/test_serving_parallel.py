"""`expert-hub serve --tensor-parallel-size 2` on the real vLLM CPU engine (two worker processes, gloo): each rank's
bank holds its shard of every task expert, and every task gives the tokens plain vLLM gives its merged checkpoint
with the same parallelism, alone, in mixed batches and after a run-time load. Plus the pieces that make it safe:
ranks that disagree, the CPU thread binding, the per-rank slice of an expert.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import pytest
import torch

from expert_hub.errors import InvalidInputError
from expert_hub.registry import Registry
from expert_hub.serving import engine, vllm_contract
from expert_hub.serving.bank_client import BankClient, WorkersDisagreeError

from .fake_bank import FakeBankedLayer
from .serving_client import start_server
from .serving_oracle import make_tasks, plain_vllm_tokens

pytestmark = pytest.mark.slow  # vLLM servers: `make test-fast` leaves it out

PROMPTS = ["Hello world, this is", "The quick brown fox jumps"]
TASKS = {"law": {0: [3, 7], 1: [3], 2: [1, 2], 3: [7]}, "code": {2: [5], 3: [6]}, "extra": {1: [8, 9], 2: [3]}}


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-tp")
    base, adapters, merged = make_tasks("qwen3_moe", root, TASKS)
    Registry(root / "registry").register(adapters["extra"])
    oracle = plain_vllm_tokens(root, {"base": base, **merged}, [(p, 12) for p in PROMPTS], tensor_parallel_size=2)
    server = start_server(
        root,
        base,
        f"law={adapters['law']},code={adapters['code']}",
        root / "registry",
        8661,
        ["--tensor-parallel-size", "2", "--enforce-eager"],
    )
    yield server, oracle
    server.process.terminate()
    server.process.wait(timeout=60)


def _tokens(server, name: str, prompt: str) -> list[int]:
    return server.complete(server.base if name == "base" else name, prompt, 12)["token_ids"]


def test_each_task_alone_and_in_mixed_batches_gives_plain_vllms_tokens(tensor_parallel):
    server, oracle = tensor_parallel
    for name in ("base", "law", "code"):
        for index, prompt in enumerate(PROMPTS):
            assert _tokens(server, name, prompt) == oracle[name][index]["token_ids"], (name, prompt)
    assert oracle["law"][0]["token_ids"] != oracle["base"][0]["token_ids"]  # the tasks really differ
    jobs = [(name, index) for name in ("base", "law", "code") for index in range(len(PROMPTS))] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: _tokens(server, job[0], PROMPTS[job[1]]), jobs))
    for (name, index), tokens in zip(jobs, results):
        assert tokens == oracle[name][index]["token_ids"], (name, index)


def test_a_task_loaded_and_unloaded_at_run_time_reaches_every_rank(tensor_parallel):
    server, oracle = tensor_parallel
    status, listing = server.request("GET", "/v1/tasks")
    assert status == 200 and listing["bank"]["layout_checked"]  # every rank wrote a base expert's shard and matched
    free = listing["bank"]["free_rows_per_layer"]
    status, body = server.request("POST", "/v1/tasks/extra")
    assert status == 200 and body["resident"]
    assert _tokens(server, "extra", PROMPTS[0]) == oracle["extra"][0]["token_ids"]
    assert server.request("DELETE", "/v1/tasks/extra")[0] == 200
    assert server.request("GET", "/v1/tasks")[1]["bank"]["free_rows_per_layer"] == free  # every rank agreed again


class _Engine:
    """An engine whose two workers answer each bank call with the given replies, recording the calls."""

    def __init__(self, load_replies: list[dict]):
        self.load_replies, self.calls = load_replies, []

    async def collective_rpc(self, method: str, args=()):
        self.calls.append(method)
        if method == "expert_hub_load_task":
            return self.load_replies
        return [True, False] if method == "expert_hub_unload_task" else [{"status": "ok", "message": ""}] * 2


def test_ranks_that_load_a_task_differently_leave_it_on_none():
    from expert_hub.serving.worker import LoadResult

    loaded = asdict(LoadResult("loaded", 1, seconds=0.2))
    agreeing = _Engine([loaded, loaded | {"seconds": 0.3}])  # each rank times its own load: still agreeing
    result = asyncio.run(BankClient(agreeing).load_task("key", "/adapter"))
    assert (result.row, result.seconds) == (1, 0.3)
    assert agreeing.calls == ["expert_hub_load_task"]
    split = _Engine([loaded, asdict(LoadResult("bank_full", message="layer 0 is full"))])
    with pytest.raises(WorkersDisagreeError, match="answered expert_hub_load_task differently"):
        asyncio.run(BankClient(split).load_task("key", "/adapter"))
    assert split.calls == ["expert_hub_load_task", "expert_hub_unload_task"]


def test_each_rank_writes_its_slice_of_an_expert_as_vllm_loads_the_base():
    """Rank 1 of 2 holds rows 4..8 of gate and up and columns 4..8 of down; its check fails on rank 0's slice."""
    from expert_hub.serving.worker import check_row_layout

    gate, up, down = torch.randn(8, 16), torch.randn(8, 16), torch.randn(16, 8)
    expert = {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}
    layer = FakeBankedLayer(experts=2, spare=1, intermediate=4, shard=(1, 2))
    layer.w13_weight[0], layer.w2_weight[0] = torch.cat([gate[4:], up[4:]]), down[:, 4:]
    layer.w13_weight[1], layer.w2_weight[1] = torch.cat([gate[:4], up[:4]]), down[:, :4]
    assert check_row_layout(layer, 2, 0, expert).status == "ok"
    assert check_row_layout(layer, 2, 1, expert).status == "wrong_layout"


def test_cpu_workers_get_their_own_cores_only_where_vllm_cannot_bind_them(monkeypatch):
    monkeypatch.setattr(vllm_contract, "is_cpu", lambda: True)
    monkeypatch.setattr(vllm_contract, "cpu_thread_binding_is_default", lambda: True)
    monkeypatch.setattr(vllm_contract, "cpu_layout", lambda: (1, [0, 1, 2, 3, 4]))
    assert engine.cpu_thread_binding(2) == "0,1|2,3"
    assert engine.cpu_thread_binding(1) is None  # one worker: vLLM's default
    monkeypatch.setattr(vllm_contract, "cpu_layout", lambda: (2, list(range(8))))
    assert engine.cpu_thread_binding(2) is None  # a NUMA node per worker: vLLM binds them itself
    monkeypatch.setattr(vllm_contract, "cpu_layout", lambda: (1, [0]))
    with pytest.raises(InvalidInputError, match="needs a CPU per worker and 1 are available"):
        engine.cpu_thread_binding(2)
    monkeypatch.setattr(vllm_contract, "cpu_thread_binding_is_default", lambda: False)
    assert engine.cpu_thread_binding(2) is None  # the user's own binding wins
