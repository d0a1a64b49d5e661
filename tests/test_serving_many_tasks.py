"""A hub of many tasks on the real vLLM engine: twelve registered tasks, a bank with room for two, eight requests in
flight. Every request waits for its task rather than failing and gets the tokens the task gives when served alone
(the per-task fidelity to merged checkpoints is `test_serving.py`'s); a client that disconnects while waiting
gives its place up; evicted tasks come back from host memory.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from expert_hub import ExpertAdapter, ExpertSelection
from expert_hub.models import load_base
from expert_hub.registry import Registry
from expert_hub.testing import SERVING_SHAPES, build_tiny_model, byte_tokenizer

from .serving_client import API_KEY, CONTEXT, LONG, start_server

pytestmark = pytest.mark.slow  # vLLM servers: `make test-fast` leaves it out

TASKS = 12
PROMPT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-many")
    shape = SERVING_SHAPES["qwen3_moe"] | {"max_position_embeddings": CONTEXT}
    base = build_tiny_model("qwen3_moe", root / "base", **shape)
    byte_tokenizer().save_pretrained(base)
    model, draw = load_base(str(base)), random.Random(0)
    registry = Registry(root / "registry")
    for index in range(TASKS):  # two experts in each of the 4 layers: a bank of 4 rows holds two tasks
        selection = ExpertSelection({layer: sorted(draw.sample(range(16), 2)) for layer in range(4)})
        adapter = ExpertAdapter.from_model(model, selection, task=f"t{index}")
        generator = torch.Generator().manual_seed(index)
        adapter.tensors = {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in adapter.tensors.items()}
        registry.register(adapter.save(root / f"t{index}"))
    options = ["--all-tasks", "--expert-bank-rows", "4", "--enforce-eager"]
    server = start_server(root, base, "", root / "registry", 8661, options, max_model_len=CONTEXT)
    yield server
    server.process.terminate()
    server.process.wait(timeout=60)


def _completion(server, task: str, max_tokens: int = 8, **extra) -> tuple[int, object]:
    body = {"model": task, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    body |= extra
    status, answer = server.request("POST", "/v1/completions", body)
    return status, answer["choices"][0]["token_ids"] if status == 200 else answer


def test_twelve_tasks_on_room_for_two_every_request_gets_its_tasks_tokens(hub):
    alone = {f"t{index}": _completion(hub, f"t{index}") for index in range(TASKS)}  # one at a time
    assert all(status == 200 for status, _ in alone.values()), alone
    assert len({tuple(tokens) for _, tokens in alone.values()}) > TASKS // 2  # the tasks really differ
    weights = [1 / (rank + 1) ** 1.1 for rank in range(TASKS)]  # Zipf(1.1) over the tasks
    names = random.Random(1).choices(list(alone), weights, k=96)
    with ThreadPoolExecutor(8) as clients:
        answers = list(clients.map(lambda name: (name, _completion(hub, name)), names))
    wrong = [(name, status, tokens) for name, (status, tokens) in answers if (status, tokens) != alone[name]]
    assert not wrong, wrong[:3]
    listing = hub.request("GET", "/v1/tasks")[1]
    assert listing["scheduler"]["resident"] <= 2 and listing["scheduler"]["waiting"] == 0
    assert listing["scheduler"]["hits"]["memory"] > 0  # evicted tasks came back from host memory
    assert not any(task["in_flight"] or task["waiting"] for task in listing["data"])


def test_tasks_are_listed_in_pages(hub):
    first = hub.request("GET", "/v1/tasks?limit=5")[1]
    second = hub.request("GET", f"/v1/tasks?limit=100&after={first['last_id']}")[1]
    names = [task["id"] for task in first["data"] + second["data"]]
    assert first["has_more"] and not second["has_more"] and first["total"] == TASKS
    assert names == sorted(f"t{index}" for index in range(TASKS))
    models = {model["id"] for model in hub.request("GET", "/v1/models")[1]["data"]}
    assert set(names) <= models
    status, body = hub.request("GET", "/v1/tasks?limit=0")
    assert status == 400 and "limit" in body["error"]["message"]


def test_a_client_that_disconnects_while_waiting_gives_its_place_up(hub):
    """Two long requests pin two tasks (the whole bank); a third task's request waits, its client goes away; the
    pinned tasks are then not evicted for it, and it is never loaded, not even once the long requests end."""
    _completion(hub, "t0")
    _completion(hub, "t1")
    before = _tasks(hub)
    long = [
        threading.Thread(target=_completion, args=(hub, name, LONG), kwargs={"ignore_eos": True})
        for name in ("t0", "t1")
    ]
    for thread in long:
        thread.start()
    _until(hub, lambda tasks: tasks["t0"]["in_flight"] == tasks["t1"]["in_flight"] == 1)
    waiting = {"model": "t2", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    body = json.dumps(waiting).encode()
    with socket.create_connection(("127.0.0.1", 8661)) as client:
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {API_KEY}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        during = _until(hub, lambda tasks: tasks["t2"]["waiting"] == 1)
    after = _until(hub, lambda tasks: tasks["t2"]["waiting"] == 0)
    for thread in long:
        thread.join()
    assert during["t0"]["in_flight"] == during["t1"]["in_flight"] == 1, "the long requests ended too soon"
    assert after["t0"]["in_flight"] == after["t1"]["in_flight"] == 1, "the long requests ended too soon"
    time.sleep(1)  # a request still waiting for t2 would have it loaded by now
    ended = _tasks(hub)
    assert ended["t2"]["load_seconds"] == before["t2"]["load_seconds"] and not ended["t2"]["resident"]
    assert ended["t0"]["resident"] and ended["t1"]["resident"]


def _tasks(server) -> dict[str, dict]:
    return {task["id"]: task for task in server.request("GET", "/v1/tasks")[1]["data"]}


def _until(server, condition, seconds: float = 30) -> dict[str, dict]:
    """The task listing once `condition` holds for it (polled, so the test takes as long as the server does)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tasks = _tasks(server)
        if condition(tasks):
            return tasks
        time.sleep(0.05)
    pytest.fail(f"not within {seconds} s: {tasks}")
