"""Many tasks on a bank that holds few: requests wait for their task instead of failing, residency follows the
waiting requests fairly, evicted tasks come back from host memory, and start-up reads no task's weights.

The task manager runs against the real worker methods (`ExpertBankWorker`) over fake banked layers (`fake_bank.py`),
each bank call taking a few milliseconds as a load does, so thousands of requests take seconds; the same scenario
runs on the real vLLM engine in `test_serving_many_tasks.py`.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from expert_hub import ExpertAdapter, ExpertSelection
from expert_hub.serving import bank, worker
from expert_hub.serving.bank import BankSettings
from expert_hub.serving.manager import TaskManager
from expert_hub.serving.served_tasks import Task, TaskError

from .fake_bank import FakeBankedLayer

SHAPES = {"gate_proj": (8, 16), "up_proj": (8, 16), "down_proj": (16, 8)}


class _BankEngine:
    """`collective_rpc` on one `ExpertBankWorker` over fake banked layers; each call takes `seconds`."""

    def __init__(self, layers: list[FakeBankedLayer], seconds: float = 0.002):
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList(layers)
        self.worker = worker.ExpertBankWorker()
        self.worker.model_runner = SimpleNamespace(model=model)
        self.layers, self.seconds, self.loads = layers, seconds, []

    async def collective_rpc(self, method: str, args=()):
        await asyncio.sleep(self.seconds)
        reply = getattr(self.worker, method)(*args)
        if method == "expert_hub_load_task":
            self.loads.append(reply.get("source"))
        return [reply]


@pytest.fixture(autouse=True)
def _clean_worker(monkeypatch):
    monkeypatch.setenv(BankSettings.ENV, "")
    worker._host_cache.cache_clear()
    yield
    bank.TASK_ROWS.clear()
    worker._host_cache.cache_clear()
    worker._STAGING.clear()
    worker._LARGER_THAN_THE_TIER.clear()


def _host_tier(monkeypatch, nbytes: int) -> None:
    monkeypatch.setenv(
        BankSettings.ENV, BankSettings(1, None, None, 2, host_cache_bytes=nbytes).to_env()[BankSettings.ENV]
    )
    worker._host_cache.cache_clear()


def _tasks(root: Path, selections: dict[str, dict[int, list[int]]]) -> dict[str, Task]:
    tasks = {}
    for seed, (name, experts) in enumerate(selections.items()):
        generator = torch.Generator().manual_seed(seed)
        tensors = {
            f"model.layers.{layer}.mlp.experts.{e}.{projection}.weight": torch.randn(shape, generator=generator)
            for layer, ids in experts.items()
            for e in ids
            for projection, shape in SHAPES.items()
        }
        directory = ExpertAdapter(ExpertSelection(experts), tensors).save(root / name)
        counts = {layer: len(ids) for layer, ids in experts.items()}
        tasks[name] = Task(name, directory, 0, counts)
    return tasks


def _manager(tasks: dict[str, Task], spare: int, slots: int = 16, seconds: float = 0.002, **options) -> TaskManager:
    engine = _BankEngine([FakeBankedLayer(experts=4, spare=spare, slots=slots) for _ in range(2)], seconds)
    return TaskManager(engine, dict(tasks), SimpleNamespace(), **options)


def _runs_its_own_experts(manager: TaskManager, task: Task) -> bool:
    """While `task` is pinned: its remap row sends each of its experts to a row holding that expert's weights."""
    row = bank.TASK_ROWS[task.key]
    adapter = ExpertAdapter.load(task.directory)
    for index, layer in enumerate(manager.bank_client.engine.layers):
        for expert in range(4):
            physical = int(layer.task_remap[row, expert])
            key = f"model.layers.{index}.mlp.experts.{expert}.{{}}.weight"
            if key.format("gate_proj") not in adapter.tensors:
                if physical != expert:
                    return False
                continue
            weights = [adapter.tensors[key.format(name)] for name in ("gate_proj", "up_proj")]
            if not torch.equal(layer.w13_weight[physical], torch.cat(weights)):
                return False
    return True


TWELVE = {f"t{i}": {0: [i % 4, (i + 1) % 4], 1: [i % 4]} for i in range(12)}  # room for 2 in 4 spare rows


def test_twelve_tasks_on_room_for_two_every_request_waits_and_runs_its_own_experts(tmp_path):
    tasks = _tasks(tmp_path, TWELVE)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(12)]  # Zipf(1.1)
    picks = random.Random(0).choices(list(tasks), weights, k=400)

    async def scenario():
        manager = _manager(tasks, spare=4)
        queue = list(picks)

        async def client():
            while queue:
                name = queue.pop()
                task = await manager.acquire(name)
                try:
                    assert _runs_its_own_experts(manager, task), name
                    await asyncio.sleep(random.random() * 0.004)
                    assert _runs_its_own_experts(manager, task), name  # never evicted under a request
                finally:
                    manager.release(name)

        await asyncio.gather(*(client() for _ in range(8)))
        return manager, await manager.bank()

    manager, bank_info = asyncio.run(scenario())
    assert not manager.in_flight and not manager.residency.waiting and not manager.residency.draining
    assert 1 <= len(manager.resident) <= 2 and bank_info["free_rows_per_layer"] == 4 - 2 * len(manager.resident)
    assert manager.hits["disk"] >= 12 and 0 < manager.hits["bank"] < 400  # some requests waited for a load


def test_a_hot_task_cannot_starve_a_cold_one(tmp_path):
    """`hot` always has requests in flight and new ones arriving; a `cold` request still gets the bank: hot's new
    requests wait while its requests in flight drain."""
    tasks = _tasks(tmp_path, {"hot": {0: [0, 1]}, "cold": {0: [2, 3]}})

    async def scenario():
        manager = _manager(tasks, spare=2)
        loop = asyncio.get_running_loop()
        stop, hot_served = asyncio.Event(), []

        async def hot_client():
            while not stop.is_set():
                await manager.acquire("hot")
                hot_served.append(loop.time())
                await asyncio.sleep(0.005)
                manager.release("hot")

        clients = [asyncio.create_task(hot_client()) for _ in range(4)]
        await asyncio.sleep(0.05)
        asked = loop.time()
        cold = await asyncio.wait_for(manager.acquire("cold"), timeout=2)
        waited = loop.time() - asked
        assert _runs_its_own_experts(manager, cold)
        manager.release("cold")
        stop.set()
        await asyncio.gather(*clients)
        return waited, manager

    waited, manager = asyncio.run(scenario())
    assert waited < 1.0
    assert manager.longest_wait >= waited - 0.001 and not manager.in_flight  # wait_for resumes a loop turn later


def test_a_request_that_waits_too_long_gets_a_503_with_retry_after(tmp_path):
    tasks = _tasks(tmp_path, {"busy": {0: [0, 1]}, "other": {0: [2, 3]}})

    async def scenario():
        manager = _manager(tasks, spare=2, wait_timeout=0.1)
        await manager.acquire("busy")  # pinned for the whole test: `other` can never load
        with pytest.raises(TaskError) as refused:
            await manager.acquire("other")
        waiting = manager.residency.waiting_count()
        manager.release("busy")
        await asyncio.sleep(0.02)
        return refused.value, waiting, manager

    error, waiting, manager = asyncio.run(scenario())
    assert error.status == 503 and error.retry_after >= 1 and "within 0.1 s" in str(error)
    assert waiting == 0 and manager.timeouts == 1
    assert list(manager.resident) == ["busy"] and not manager.residency.draining  # admits again


def test_more_waiting_requests_than_allowed_are_refused_at_once(tmp_path):
    tasks = _tasks(tmp_path, {"busy": {0: [0, 1]}, "other": {0: [2, 3]}})

    async def scenario():
        manager = _manager(tasks, spare=2, max_waiting=2)
        await manager.acquire("busy")
        waiters = [asyncio.create_task(manager.acquire("other")) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(TaskError) as refused:
            await manager.acquire("other")
        manager.release("busy")
        served = await asyncio.gather(*waiters)
        for task in served:
            manager.release(task.name)
        return refused.value, served

    error, served = asyncio.run(scenario())
    assert error.status == 503 and error.retry_after >= 1 and "--max-waiting-requests" in str(error)
    assert [task.name for task in served] == ["other", "other"]


def test_a_request_cancelled_while_waiting_gives_its_place_up(tmp_path):
    """A client that disconnects: its place is gone, and the task drained for it admits requests again."""
    tasks = _tasks(tmp_path, {"busy": {0: [0, 1]}, "other": {0: [2, 3]}})

    async def scenario():
        manager = _manager(tasks, spare=2)
        await manager.acquire("busy")
        waiting = asyncio.create_task(manager.acquire("other"))
        await asyncio.sleep(0.01)
        draining = set(manager.residency.draining)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await asyncio.sleep(0.01)
        await asyncio.wait_for(manager.acquire("busy"), timeout=1)  # admitted at once again
        return draining, manager

    draining, manager = asyncio.run(scenario())
    assert draining == {"busy"}
    assert not manager.residency.waiting and not manager.residency.draining and manager.in_flight["busy"] == 2


def test_a_request_cancelled_just_after_its_task_was_granted_releases_it(tmp_path):
    """The server stopping cancels a request whose task was granted a moment before it resumed: the pin goes."""
    from expert_hub.serving.middleware import _unless_disconnected

    tasks = _tasks(tmp_path, {"a": {0: [0, 1]}})

    async def scenario():
        manager = _manager(tasks, spare=2)
        granted = asyncio.Event()

        async def acquiring():
            task = await manager.acquire("a")
            granted.set()
            return task

        async def connected():
            await asyncio.Event().wait()

        state = SimpleNamespace(manager=manager)
        request = asyncio.create_task(_unless_disconnected(state, acquiring(), connected))
        await granted.wait()  # the acquire has returned; the request has not resumed yet
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        return manager

    assert not asyncio.run(scenario()).in_flight


def test_residency_is_limited_by_rows_not_by_a_task_count_unless_capped(tmp_path):
    small = {f"s{i}": {0: [i]} for i in range(4)}  # one row each
    tasks = _tasks(tmp_path, {**small, "wide": {0: [0, 1, 2, 3], 1: [0]}})

    async def resident_after(names, **options):
        manager = _manager(tasks, spare=4, **options)
        for name in names:
            await manager.acquire(name)
            manager.release(name)
        return set(manager.resident)

    assert asyncio.run(resident_after(small)) == set(small)  # four small tasks fit in four rows
    assert asyncio.run(resident_after([*small, "wide"])) == {"wide"}  # all four make room for it
    assert len(asyncio.run(resident_after(small, max_resident=2))) == 2


def test_an_evicted_task_reloads_from_host_memory_without_reading_its_files(tmp_path, monkeypatch):
    tasks = _tasks(tmp_path, {"a": {0: [0, 1], 1: [2]}, "b": {0: [2, 3]}})
    _host_tier(monkeypatch, 1 << 20)

    async def scenario():
        manager = _manager(tasks, spare=2)
        for name in ("a", "b"):  # b evicts a, whose rows stay in host memory
            await manager.acquire(name)
            manager.release(name)

        def no_reading(*args):
            raise AssertionError("a reload from host memory read the task's files")

        monkeypatch.setattr(worker, "_kernel_rows_from_disk", no_reading)
        task = await manager.acquire("a")
        assert _runs_its_own_experts(manager, task)
        manager.release("a")
        return manager

    manager = asyncio.run(scenario())
    assert manager.bank_client.engine.loads == ["memory"] * 3  # staged in the background, then copied
    assert (manager.hits["disk"], manager.hits["memory"]) == (2, 1)
    assert set(worker._host_cache()) == {tasks["a"].key, tasks["b"].key}  # kept while resident: evictions copy nothing


def _staged_or_kept(key: str) -> bool:
    return key in worker._host_cache() or (key in worker._STAGING and worker._STAGING[key].done())


def test_the_tasks_waiting_behind_the_next_one_are_staged_before_the_bank_has_room(tmp_path, monkeypatch):
    """While `a` holds the bank, the next tasks in line are read into host memory, so each load is a copy."""
    tasks = _tasks(tmp_path, {name: {0: [0, 1]} for name in "abcd"})
    _host_tier(monkeypatch, 1 << 20)

    async def scenario():
        manager = _manager(tasks, spare=2)
        await manager.acquire("a")
        waiting = []
        for name in "bcd":
            waiting.append(asyncio.create_task(manager.acquire(name)))
            await asyncio.sleep(0.001)  # in this order
        for _ in range(1000):  # the worker keeps what is staged when next asked: done is enough here
            await asyncio.sleep(0.005)
            if all(_staged_or_kept(tasks[name].key) for name in "bcd"):
                break
        staged_while_a_ran = all(_staged_or_kept(tasks[name].key) for name in "bcd")
        manager.release("a")
        for name, pinned in zip("bcd", waiting):
            await pinned
            manager.release(name)
        return manager, staged_while_a_ran

    manager, staged_while_a_ran = asyncio.run(scenario())
    assert staged_while_a_ran
    assert manager.bank_client.engine.loads == ["memory"] * 4
    assert manager.residency.waiting == {} and list(manager.resident) == ["d"]


def test_a_removed_task_leaves_neither_the_bank_nor_host_memory_and_its_waiters_get_a_404(tmp_path, monkeypatch):
    tasks = _tasks(tmp_path, {"a": {0: [0, 1]}, "b": {0: [2, 3]}})
    _host_tier(monkeypatch, 1 << 20)

    async def scenario():
        manager = _manager(tasks, spare=2)
        for name in ("a", "b"):
            await manager.acquire(name)
            manager.release(name)
        await manager.acquire("b")
        waiting = asyncio.create_task(manager.acquire("a"))  # waits while b is pinned
        await asyncio.sleep(0.01)
        await manager.remove("a")
        with pytest.raises(TaskError) as gone:
            await waiting
        manager.release("b")
        await manager.remove("b")
        return gone.value

    assert asyncio.run(scenario()).status == 404
    assert not bank.TASK_ROWS and not len(worker._host_cache())


def test_base_checks_run_beside_the_scheduler_one_at_a_time_and_a_task_trained_elsewhere_gets_a_422(
    tmp_path, monkeypatch
):
    """A task's base check (the fingerprint of the base experts it replaces, read from the checkpoint at its first
    load) runs beside the scheduler, one at a time in the order of the line: the first task is served once its own
    check has passed, not after every check in line, and a task trained from other base weights is refused with a
    422 while the others are served."""
    import threading
    import time

    from expert_hub.errors import InvalidInputError
    from expert_hub.serving import manager as manager_module

    tasks = _tasks(tmp_path, {"a": {0: [0]}, "b": {0: [1]}, "c": {0: [2]}, "elsewhere": {0: [3]}})
    events, running, lock = [], [0], threading.Lock()

    def check_base_fingerprint(base: str, task: Task) -> None:
        with lock:
            running[0] += 1
            events.append(("checking", task.name, running[0]))
        time.sleep(0.1)  # reading and hashing the base experts
        with lock:
            running[0] -= 1
        if task.name == "elsewhere":
            raise InvalidInputError(f"task {task.name} was trained from other base weights than {base}")
        task.base_checked = True
        events.append(("checked", task.name))

    monkeypatch.setattr(manager_module, "check_base_fingerprint", check_base_fingerprint)

    async def scenario():
        manager = _manager(tasks, spare=4, base=str(tmp_path / "base"), wait_timeout=10)

        async def ask(name: str) -> str | TaskError:
            try:
                await manager.acquire(name)
            except TaskError as error:
                return error
            events.append(("served", name))
            manager.release(name)
            return name

        return await asyncio.gather(*(ask(name) for name in tasks))

    *served, refused = asyncio.run(scenario())
    assert served == ["a", "b", "c"] and isinstance(refused, TaskError)
    assert refused.status == 422 and "other base weights" in str(refused)
    assert [event[1] for event in events if event[0] == "checking"] == list(tasks)  # in the order of the line
    assert all(event[2] == 1 for event in events if event[0] == "checking")  # one at a time
    assert events.index(("served", "a")) < events.index(("checked", "c"))  # not after every check in line


def test_a_task_larger_than_the_bank_is_refused_before_it_waits(tmp_path):
    tasks = _tasks(tmp_path, {"huge": {0: [0, 1, 2]}})

    async def scenario():
        with pytest.raises(TaskError) as refused:
            await _manager(tasks, spare=2).acquire("huge")
        return refused.value

    error = asyncio.run(scenario())
    assert error.status == 507 and "3 experts in layer 0" in str(error)


def test_serving_every_registered_task_reads_no_tasks_weights_at_start(tmp_path, monkeypatch):
    """`serve --all-tasks` reads each task's manifest and safetensors headers only: its bytes are hashed, and its
    base fingerprint compared, at its first load."""
    from expert_hub import adapter as adapter_module
    from expert_hub import integrity
    from expert_hub.models import describe_model, load_base
    from expert_hub.registry import Registry
    from expert_hub.serving import resolve_tasks
    from expert_hub.serving import served_tasks as tasks_module
    from expert_hub.testing import SERVING_SHAPES, build_tiny_model

    base = str(build_tiny_model("qwen3_moe", tmp_path / "base", **SERVING_SHAPES["qwen3_moe"]))
    model, registry = load_base(base), Registry(tmp_path / "registry")
    for index in range(40):
        selection = ExpertSelection({index % 4: [index % 16]})
        registry.register(ExpertAdapter.from_model(model, selection, task=f"t{index}").save(tmp_path / f"t{index}"))
    registry.register(ExpertAdapter.from_model(model, ExpertSelection({0: [1, 2]}), task="t0").save(tmp_path / "v2"))

    def reads_weights(*args, **kwargs):
        raise AssertionError("start-up read a task's weights")

    for module, name in (
        (adapter_module, "load_file"),
        (integrity, "read_verified"),
        (integrity, "sha256_file"),
        (tasks_module, "checkpoint_fingerprint"),
    ):
        monkeypatch.setattr(module, name, reads_weights)
    served = resolve_tasks(base, describe_model(base), [], True, registry)
    assert sorted(served) == sorted(f"t{index}" for index in range(40))
    assert served["t0"].version == 2 and served["t0"].experts_per_layer == {0: 2}  # the newest version
    assert all(task.sha256 and not task.base_checked for task in served.values())  # checked at first load


def test_a_task_from_the_hub_is_pulled_on_demand_only_when_allowed_and_once(tmp_path, hub, monkeypatch):
    from expert_hub.models import describe_model, load_base
    from expert_hub.registry import Registry
    from expert_hub.registry import hub as hub_module
    from expert_hub.testing import SERVING_SHAPES, build_tiny_model

    base = str(build_tiny_model("qwen3_moe", tmp_path / "base", **SERVING_SHAPES["qwen3_moe"]))
    summary, publisher = describe_model(base), Registry(tmp_path / "publisher")
    adapter = ExpertAdapter.from_model(load_base(base), ExpertSelection({0: [3], 2: [1, 5]}), task="law")
    publisher.register(adapter.save(tmp_path / "law"))
    hub_module.push(publisher, "law", "acme/law")
    pulls, pull = [], hub_module.pull

    def counted(*args, **kwargs):
        pulls.append(args[1])
        return pull(*args, **kwargs)

    monkeypatch.setattr(hub_module, "pull", counted)
    registry = Registry(tmp_path / "server")

    async def ask(allow_pull: tuple[str, ...], names: list[str]) -> list:
        layers = [FakeBankedLayer(experts=16, spare=4, intermediate=64, hidden=128) for _ in summary.moe_layers]
        manager = TaskManager(_BankEngine(layers), {}, summary, registry, base, allow_pull=allow_pull)

        async def one(name):
            task = await manager.acquire(name)
            manager.release(name)
            return task

        return await asyncio.gather(*(one(name) for name in names), return_exceptions=True)

    refused = asyncio.run(ask((), ["acme/law"]))[0]
    assert isinstance(refused, TaskError) and refused.status == 404 and not pulls  # no allowlist: as today
    refused = asyncio.run(ask(("acme/*",), ["acme/law@1"]))[0]  # a version is not a repo
    assert isinstance(refused, TaskError) and refused.status == 404 and not pulls
    refused = asyncio.run(ask(("other/*",), ["acme/law"]))[0]
    assert isinstance(refused, TaskError) and refused.status == 404 and not pulls
    served = asyncio.run(ask(("acme/*",), ["acme/law"] * 3 + ["acme/missing"]))
    assert [task.name for task in served[:3]] == ["acme/law"] * 3 and sorted(pulls) == ["acme/law", "acme/missing"]
    assert isinstance(served[3], TaskError) and served[3].status == 404 and "not found" in str(served[3])
    assert [entry.ref for entry in registry.entries()] == ["acme/law@1"]  # registered, verified, for this base
    assert asyncio.run(ask(("acme/*",), ["acme/law"]))[0].name == "acme/law" and len(pulls) == 2  # registered now


# Run in a process of its own, started with the OpenMP binding vLLM exports for its CPU worker: the stager's cores
# at its start, in its first parallel region (the CPU kernel's prepacking) and after staging that task.
_STAGER_CORES = """
import json, os, sys, torch
from expert_hub.serving import vllm_contract, worker
server = set(json.loads(sys.argv[1]))
vllm_contract.server_cores = lambda: server
os.sched_setaffinity(0, {min(server)})  # the worker's main thread, bound to its compute core
prepack = vllm_contract.internal("CPU expert prepacking")

def first_parallel_region(*task):
    weights = torch.zeros(1, 64, 64, dtype=torch.bfloat16)
    prepack(weights, torch.empty_like(weights), "vec")
    return sorted(os.sched_getaffinity(0))

worker._kernel_rows_from_disk = first_parallel_region
stager = worker._stager()
cores = lambda: sorted(stager.submit(os.sched_getaffinity, 0).result())
print(json.dumps([cores(), stager.submit(worker._staged, {}, "", None).result(), cores()]))
"""


def test_tasks_are_staged_on_the_cores_the_worker_does_not_compute_on():
    """vLLM binds its CPU worker to its compute cores, and OpenMP binds any thread there at its first parallel
    region; staging a task in the background while the model steps runs on the server's other cores all the same,
    so that it takes as little from the model's steps as the machine allows."""
    import json
    import os
    import subprocess
    import sys

    server = sorted(os.sched_getaffinity(0))
    assert len(server) > 1, "the CI machine has 2 cores"
    compute, spare = server[:1], server[1:]
    binding = {"GOMP_CPU_AFFINITY": str(compute[0]), "OMP_NUM_THREADS": "1"}  # as vLLM sets them for its worker
    run = subprocess.run(
        [sys.executable, "-c", _STAGER_CORES, json.dumps(server)],
        env=os.environ | binding,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    at_start, in_the_region, after = json.loads(run.stdout.splitlines()[-1])
    assert in_the_region == compute  # what OpenMP does: the test would not see the stager stay there otherwise
    assert at_start == after == spare


def test_a_task_added_again_while_its_old_version_is_being_removed_waits_and_runs_its_own_experts(tmp_path):
    """DELETE waits for the bank while another load holds it; a POST of the same name meanwhile must not be
    admitted on the old version's rows (its new key has none: its tokens would run on the base experts)."""
    tasks = _tasks(tmp_path, {"a": {0: [0, 1]}})

    async def scenario():
        manager = _manager(tasks, spare=4)
        await manager.acquire("a")
        manager.release("a")
        async with manager._bank_lock:  # the bank is busy with another task's load
            removing = asyncio.create_task(manager.remove("a"))
            await asyncio.sleep(0.01)
            again = manager._remember(Task("a", tasks["a"].directory, 0, {0: 2}))  # POST /v1/tasks/a
            asking = asyncio.create_task(manager.acquire("a"))
            await asyncio.sleep(0.01)
            admitted_early = asking.done()
        await removing
        task = await asyncio.wait_for(asking, timeout=2)
        return admitted_early, task, again, manager

    admitted_early, task, again, manager = asyncio.run(scenario())
    assert not admitted_early and task is again and bank.TASK_ROWS.keys() == {again.key}
    assert _runs_its_own_experts(manager, task)


def test_ranks_may_differ_in_their_host_memory_tiers_but_not_in_their_banks():
    """Each tensor-parallel rank keeps its own LRU of tasks: one may copy a task from memory while another reads it
    from disk, and their tiers fill a poll apart; their rows must still agree."""
    from expert_hub.serving.bank_client import BankClient, WorkersDisagreeError
    from expert_hub.serving.worker import LoadResult

    class TwoRanks:
        def __init__(self, replies):
            self.replies = replies

        async def collective_rpc(self, method, args=()):
            return self.replies[method]

    geometry = {
        "layers": 2,
        "rows_per_layer": 4,
        "free_rows_per_layer": 2,
        "task_slots": 8,
        "bytes": 1,
        "bytes_per_row": 1,
    }
    tiers = [
        {"host_cache_tasks": 1, "host_cache_bytes": 5, "host_cache_max_bytes": 9},
        {"host_cache_tasks": 0, "host_cache_bytes": 0, "host_cache_max_bytes": 9},
    ]
    memory, disk = (
        asdict(LoadResult("loaded", 1, source="memory", seconds=0.1)),
        asdict(LoadResult("loaded", 1, source="disk", seconds=0.2)),
    )
    ranks = TwoRanks(
        {"expert_hub_bank_info": [geometry | tiers[0], geometry | tiers[1]], "expert_hub_load_task": [memory, disk]}
    )
    info = asyncio.run(BankClient(ranks).bank_info())
    assert info == geometry | {"host_cache_tasks": 0, "host_cache_bytes": 5, "host_cache_max_bytes": 18}
    loaded = asyncio.run(BankClient(ranks).load_task("key", "/adapter"))
    assert (loaded.row, loaded.source, loaded.seconds) == (1, "disk", 0.2)
    ranks.replies["expert_hub_bank_info"][1] = geometry | tiers[1] | {"free_rows_per_layer": 1}
    with pytest.raises(WorkersDisagreeError):
        asyncio.run(BankClient(ranks).bank_info())


def test_a_task_removed_while_it_is_staged_leaves_nothing_behind(tmp_path, monkeypatch):
    tasks = _tasks(tmp_path, {"a": {0: [0, 1]}})
    _host_tier(monkeypatch, 1 << 20)
    engine = _BankEngine([FakeBankedLayer(experts=4, spare=2, slots=4) for _ in range(2)])
    key, directory = tasks["a"].key, str(tasks["a"].directory)
    assert engine.worker.expert_hub_stage_tasks([(key, directory, None)]) == [{"status": "staging", "message": ""}]
    engine.worker.expert_hub_unload_task(key)  # DELETE
    worker._STAGING.get(key, SimpleNamespace(result=lambda: None)).result()
    engine.worker.expert_hub_stage_tasks([])  # any later call collects what was staged by then
    assert key not in worker._STAGING and key not in worker._host_cache()


def test_a_503_that_says_when_to_retry_carries_retry_after():
    """Both the task routes and the admin routes answer a wait that ran out with `Retry-After`."""
    from expert_hub.serving.admin_routes import _refusal
    from expert_hub.serving.middleware import _refuse

    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(_refuse(send, TaskError("task t was not loaded within 60 s", 503, retry_after=7)))
    assert sent[0]["status"] == 503 and (b"retry-after", b"7") in sent[0]["headers"]
    assert b'"code": 503' in sent[1]["body"]
    response = _refusal(TaskError("busy", 503, retry_after=3))
    assert response.status_code == 503 and response.headers["retry-after"] == "3"
    assert "retry-after" not in _refusal(TaskError("gone", 404)).headers
