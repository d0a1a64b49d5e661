"""`expert-hub serve` attacked as hostile and careless clients would: a request gets exactly the experts it asked for.

One eager qwen3_moe server, started as docs/serving.md says (no environment variables, `--api-key`), serves law and intent
from the registry and `scratch` from a directory; the registry also holds tasks that must never hurt anyone: one
whose weights are finite but huge (its tokens turn NaN), one naming an expert the model lacks, one with misshapen
tensors. The tokens of law, intent and the base model are recorded first and must never change.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from expert_hub import ExpertAdapter, ExpertSelection
from expert_hub.adapter import AdapterMetadata
from expert_hub.models import load_base
from expert_hub.registry import Registry
from expert_hub.testing import SERVING_SHAPES, build_tiny_model

from .serving_client import API_KEY, start_server

pytestmark = pytest.mark.slow  # vLLM servers: `make test-fast` leaves it out

PROMPT = "Hello world, this is"
LONG = " ".join(f"word{i}" for i in range(50))  # ~340 tokens: more than two 128-token KV blocks
LAW = {0: [3, 7], 1: [3], 2: [1, 2], 3: [7]}
EXPERTS = {
    "law": LAW,
    "intent": {0: [3, 9], 1: [4], 3: [0, 15]},
    "huge": {1: [2, 5], 2: [0]},
    "scratch": {2: [6]},
    "gone": {1: [8, 9]},
}


def _adapter(model, name: str, experts: dict, seed: int, scale: float = 0.3) -> ExpertAdapter:
    adapter = ExpertAdapter.from_model(model, ExpertSelection(experts), task=name)
    generator = torch.Generator().manual_seed(seed)
    adapter.tensors = {k: torch.randn(v.shape, generator=generator) * scale for k, v in adapter.tensors.items()}
    return adapter


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-isolation")
    base = build_tiny_model("qwen3_moe", root / "base", **SERVING_SHAPES["qwen3_moe"])
    model = load_base(str(base))
    registry = Registry(root / "registry")
    for seed, name in enumerate(("law", "intent", "huge")):
        registry.register(
            _adapter(model, name, EXPERTS[name], seed, scale=1e20 if name == "huge" else 0.3).save(root / name)
        )
    expert = ExpertAdapter.from_model(model, ExpertSelection({1: [2]})).tensors  # one expert of layer 1
    for name, number, gate_rows in (("outofrange", 99, 64), ("misshapen", 2, 63)):
        tensors = {
            key.replace(".experts.2.", f".experts.{number}."): torch.zeros(
                (gate_rows, 128) if "gate_proj" in key else tuple(value.shape)
            )
            for key, value in expert.items()
        }
        adapter = ExpertAdapter(
            ExpertSelection({1: [number]}), tensors, AdapterMetadata(task=name, base_model=str(base))
        )
        registry.register(adapter.save(root / name))
    _adapter(model, "scratch", EXPERTS["scratch"], 4).save(root / "scratch")
    # A small KV cache (20 blocks of 128 tokens), so that blocks one request freed soon serve another.
    server = start_server(
        root,
        base,
        f"law,intent,scratch={root / 'scratch'}",
        root / "registry",
        8651,
        ["--max-resident-tasks", "2", "--enforce-eager", "--enable-prompt-tokens-details", "--kv-cache-gb", "0.005"],
    )
    server.root, server.registry = root, registry
    server.expected = {
        name: server.complete(server.base if name == "base" else name, prompt, 8)["token_ids"]
        for name in ("base", "law", "intent")
        for prompt in (PROMPT,)
    }
    assert len({tuple(tokens) for tokens in server.expected.values()}) == 3  # the tasks really differ
    yield server
    engine = psutil.Process(server.process.pid).children(recursive=True)
    assert engine  # vLLM's engine process and its worker
    server.process.kill()  # outright, as the OOM killer would: the engine must not outlive the server
    server.process.wait(timeout=60)
    _, alive = psutil.wait_procs(engine, timeout=60)
    assert not alive, f"{[process.name() for process in alive]} outlived a killed server"


def _unchanged(server) -> None:
    """The recorded tokens of law, intent and the base model; and every bank row not held by a resident task free."""
    for name, tokens in server.expected.items():
        assert server.complete(server.base if name == "base" else name, PROMPT, 8)["token_ids"] == tokens, name
    listing = server.request("GET", "/v1/tasks")[1]
    resident = [task["id"] for task in listing["data"] if task["resident"]]
    rows = listing["bank"]["rows_per_layer"]
    held = [sum(len(EXPERTS[name].get(layer, [])) for name in resident) for layer in range(4)]
    assert listing["bank"]["free_rows_per_layer"] == rows - max(held), resident


def test_every_route_but_health_needs_the_key(server):
    status, spec = server.request("GET", "/openapi.json")
    assert status == 200
    routes = [
        (method.upper(), path.replace("{response_id}", "resp_x"))
        for path, methods in spec["paths"].items()
        for method in methods
    ]
    routes += [
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/redoc"),
        ("GET", "/v1/tasks"),
        ("POST", "/v1/tasks/law"),
        ("DELETE", "/v1/tasks/law"),
        ("POST", "/scale_elastic_ep"),
    ]
    assert {"/metrics", "/invocations", "/tokenize", "/v1/responses", "/load", "/version"} <= {p for _, p in routes}
    for method, path in routes:
        for key in (None, "wrong", API_KEY.upper()):
            status, body = server.request(method, path, b"{}" if method == "POST" else None, key=key)
            expected = 200 if path == "/health" else 401
            assert status == expected, (method, path, key, body)
            if status == 401:
                assert body["error"]["type"] == "AuthenticationError"
    assert server.request("GET", "/version", key=None, headers={"authorization": f"bearer {API_KEY}"})[0] == 200
    assert server.request("GET", "/version", key=None, headers={"authorization": f"Basic {API_KEY}"})[0] == 401
    for path in ("/metrics", "/v1/completions", "/v1/tasks"):  # OPTIONS reaches Prometheus' app, which ignores methods
        assert server.request("OPTIONS", path, key=None)[0] == 401, path
    preflight = {"origin": "http://example.com", "access-control-request-method": "POST"}
    status, body = server.request("OPTIONS", "/v1/completions", key=None, headers=preflight)
    assert (status, body) == (400, b"Disallowed CORS origin")  # browsers send no key: vLLM's CORS answers (no origins
    # are allowed unless --allowed-origins says so)


def test_private_task_arguments_cannot_be_smuggled(server):
    """Only the server sets the worker's task: a client's own vllm_xargs, on any endpoint, run the base experts."""
    for xargs in (
        {"task": "law"},
        {"expert_hub_task": "law"},
        {"expert_hub_task": ["law"]},
        {"expert_hub_task": 1},
        {"expert_hub_task": hashlib.sha256(b"law").hexdigest()[:32]},
    ):
        result = server.complete(server.base, PROMPT, 8, vllm_xargs=xargs)
        assert result["token_ids"] == server.expected["base"], xargs
        assert server.complete("intent", PROMPT, 8, vllm_xargs=xargs)["token_ids"] == server.expected["intent"]
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0}
    plain = server.request("POST", "/v1/chat/completions", {"model": server.base, **chat})[1]
    smuggled = server.request(
        "POST", "/v1/chat/completions", {"model": server.base, **chat, "vllm_xargs": {"expert_hub_task": "law"}}
    )[1]
    assert smuggled["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    _unchanged(server)


def test_cache_salts_cannot_be_forged(server):
    """law's KV blocks are shared by law's requests only, whatever salt another request carries."""

    def cached(model: str, **extra) -> int:
        usage = server.complete(model, LONG, 2, **extra)["usage"]
        return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0

    cached("law")
    assert cached("law") >= 256  # law's own blocks are reused
    old_salt = "expert-hub-" + hashlib.sha256(b"law").hexdigest()[:32]  # the salt before it was keyed
    for salt in (old_salt, "law", "expert-hub-law"):
        assert cached(server.base, cache_salt=salt) == 0, salt
    assert cached("law", cache_salt="mine") == 0  # a client's salt splits the task's namespace further
    assert cached("law", cache_salt="mine") >= 256
    assert cached("intent", cache_salt="mine") == 0


def _text(path: str, body: dict) -> str:
    if path == "/v1/responses":
        return "".join(part["text"] for item in body["output"] for part in item.get("content", []))
    if path == "/v1/messages":
        return body["content"][0]["text"]
    choice = body["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_every_generating_endpoint_runs_the_named_task(server):
    """Each endpoint and each selector: the task's tokens are counted for that task, and the text is the task's."""
    chat = [{"role": "user", "content": PROMPT}]
    requests = {
        "/v1/completions": {"prompt": PROMPT, "max_tokens": 8},
        "/invocations": {"prompt": PROMPT, "max_tokens": 8},
        "/v1/chat/completions": {"messages": chat, "max_tokens": 8},
        "/v1/chat/completions/batch": {"messages": [chat, chat], "max_tokens": 8},
        "/v1/messages": {"messages": chat, "max_tokens": 8},
        "/v1/responses": {"input": PROMPT, "max_output_tokens": 8},
    }
    texts = {}
    for path, request in requests.items():
        request = {**request, "temperature": 0, "ignore_eos": True}
        for name in ("base", "law"):
            selectors = (
                [({"model": server.base}, {})]
                if name == "base"
                else [
                    ({"model": "law"}, {}),
                    ({"model": server.base, "task": "law"}, {}),
                    ({"model": server.base}, {"x-expert-task": "law"}),
                ]
            )
            for fields, headers in selectors:
                before = server.counters()
                status, body = server.request("POST", path, {**request, **fields}, headers=headers)
                assert status == 200, (path, fields, body)
                after = server.counters()
                key = f'expert_hub_task_completion_tokens_total{{task="{name}"}}'
                usage = body["usage"]
                reported = usage.get("completion_tokens", usage.get("output_tokens"))
                assert after[key] - before.get(key, 0) == reported > 0, (path, fields)
                assert body.get("model") == (server.base if name == "base" else "law"), (path, body.get("model"))
                texts.setdefault((path, name), set()).add(_text(path, body))
    for path in requests:
        assert len(texts[path, "law"]) == 1 and texts[path, "law"] != texts[path, "base"], path
    chat_like = ("/v1/chat/completions", "/v1/chat/completions/batch", "/v1/messages")
    assert len({frozenset(texts[path, "law"]) for path in chat_like}) == 1
    assert texts["/invocations", "law"] == texts["/v1/completions", "law"]


def test_a_task_selector_elsewhere_is_refused_never_answered_by_the_base(server):
    for method, path, body in (
        ("POST", "/generative_scoring", {"model": "law", "query": "x", "items": ["a"]}),
        ("POST", "/v1/systemone", {"model": "law"}),
        ("POST", "/v1/completions/render", {"task": "law", "prompt": "x"}),
        ("GET", "/version", None),
        ("GET", "/load", None),
    ):
        status, answer = server.request(method, path, body, headers={"x-expert-task": "law"})
        assert status == 400 and answer["error"]["message"].startswith(f"{path} does not serve tasks"), (path, answer)
    status, tokens = server.request("POST", "/tokenize", {"model": "law", "prompt": PROMPT})
    assert status == 200 and tokens == server.request("POST", "/tokenize", {"model": server.base, "prompt": PROMPT})[1]
    for path, body in (
        ("/tokenize", {"model": "lawyer", "prompt": "x"}),
        ("/v1/completions", {"model": "lawyer", "prompt": "x"}),
        ("/v1/responses", {"model": "lawyer", "input": "x"}),
    ):
        status, answer = server.request("POST", path, body)
        assert status == 404 and answer["error"]["type"] == "NotFoundError", (path, answer)
        assert all(name in answer["error"]["message"] for name in ("lawyer", "law", "intent", "scratch", server.base))
    status, answer = server.request("POST", "/v1/completions", {"model": "law", "task": "intent", "prompt": "x"})
    assert status == 400 and "several tasks" in answer["error"]["message"]
    for odd in ({"model": ["law"]}, {"model": {"a": 1}}, {"task": ["law"]}, {"task": None}):
        status, answer = server.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, **odd})
        assert 400 <= status < 500 and "error" in answer, (odd, answer)
    status, answer = server.request(
        "POST", "/v1/responses", {"model": "law", "input": "x", "background": True, "store": True}
    )
    assert status == 400 and "background" in answer["error"]["message"]
    # vLLM's beam search makes its own sampling parameters without the task's key (it would run the base experts
    # under the task's cache salt and poison the task's prefix cache): refused for tasks.
    beam = {"prompt": PROMPT, "max_tokens": 4, "use_beam_search": True, "n": 2}
    status, answer = server.request("POST", "/v1/completions", {"model": "law", **beam})
    assert status == 400 and "beam search" in answer["error"]["message"]
    assert server.request("POST", "/v1/completions", {"model": server.base, **beam})[0] == 200
    for salt in ("", 7, ["x"]):
        status, answer = server.request("POST", "/v1/completions", {"model": "law", "prompt": "x", "cache_salt": salt})
        assert status == 400 and "cache_salt" in answer["error"]["message"], salt


def test_a_task_whose_tokens_turn_nan_cannot_change_any_other_request(server):
    """huge's weights are finite but its activations overflow: NaN K/V it writes must not reach anyone else."""
    status, body = server.request("POST", "/v1/tasks/huge")
    assert status == 200, body
    for other in ("law", "intent"):  # two resident tasks at most: huge and one other share batches with the base
        with ThreadPoolExecutor(6) as pool:  # huge's own logprobs are NaN: it is asked for tokens only
            jobs = {
                (name, prompt): pool.submit(server.complete, server.base if name == "base" else name, prompt, 8)
                for name in (other, "base")
                for prompt in (PROMPT, LONG)
            }
            jobs |= {
                ("huge", prompt): pool.submit(
                    server.request,
                    "POST",
                    "/v1/completions",
                    {"model": "huge", "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True},
                )
                for prompt in (PROMPT, LONG)
            }
        status, body = jobs["huge", PROMPT].result()
        assert status == 200 and body["choices"][0]["token_ids"] == [0] * 8  # NaN logits: argmax is token 0
        for name in (other, "base"):
            assert jobs[name, PROMPT].result()["token_ids"] == server.expected[name]
        huge = {"model": "huge", "prompt": PROMPT, "max_tokens": 8}
        for name in server.expected:  # the next request gets the block huge's request just freed
            assert server.request("POST", "/v1/completions", huge)[0] == 200
            assert (
                server.complete(server.base if name == "base" else name, PROMPT, 8)["token_ids"]
                == server.expected[name]
            ), name
        _unchanged(server)
    assert server.request("DELETE", "/v1/tasks/huge")[0] == 200
    _unchanged(server)


def test_bad_tasks_are_refused_before_the_bank_is_touched(server):
    """Out-of-range experts, wrong shapes, NaN weights written after start-up: refused, nothing else moves."""
    _unchanged(server)
    _, before = server.request("GET", "/v1/tasks")
    for _ in range(3):  # repeated failures never leak rows or lock the bank
        for name, message in (("outofrange", "selects expert 99 of layer 1"), ("misshapen", "has shape (63, 128)")):
            status, body = server.request("POST", f"/v1/tasks/{name}")
            assert status == 422 and message in body["error"]["message"], body
            assert str(server.root) not in body["error"]["message"]
    _, after = server.request("GET", "/v1/tasks")  # refused before anything was evicted or written
    assert after["bank"] == before["bank"] and after["data"] == before["data"]
    weights = server.root / "scratch" / "experts.safetensors"  # changed on disk after the server checked it
    save_file({key: torch.full_like(value, float("nan")) for key, value in load_file(weights).items()}, weights)
    status, body = server.request("POST", "/v1/completions", {"model": "scratch", "prompt": PROMPT, "max_tokens": 4})
    assert status == 422 and "NaN" in body["error"]["message"] and str(server.root) not in body["error"]["message"]
    assert server.request("POST", "/v1/completions", {"model": "scratch", "prompt": "x"})[0] == 404  # dropped
    _unchanged(server)


def test_deleting_a_task_while_requests_race_for_it(server):
    """Every request either runs law's experts or gets a clean 404 / 409 / 503: never a 500, never other tokens."""
    statuses, deletions = [], []
    body = {"model": "law", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    for cycle in range(40):
        with ThreadPoolExecutor(5) as pool:
            requests = [pool.submit(server.request, "POST", "/v1/completions", body) for _ in range(cycle % 4)]
            deletion = pool.submit(server.request, "DELETE", "/v1/tasks/law")
            requests += [pool.submit(server.request, "POST", "/v1/completions", body) for _ in range(4 - cycle % 4)]
            for future in requests:
                status, answer = future.result()
                statuses.append(status)
                assert status in (200, 404, 503), answer
                if status == 200:
                    assert answer["choices"][0]["token_ids"] == server.expected["law"]
            deletions.append(deletion.result()[0])
        assert server.request("POST", "/v1/tasks/law")[0] == 200
    assert set(deletions) <= {200, 409} and 200 in deletions and 200 in statuses
    _unchanged(server)


def test_versions_and_removed_entries(server):
    registry = server.registry
    status, body = server.request("POST", "/v1/tasks/law@1")
    assert status == 200 and (body["task"], body["version"]) == ("law", 1)
    assert {task["id"] for task in server.request("GET", "/v1/tasks")[1]["data"]} >= {"law"}
    assert "law@1" not in {task["id"] for task in server.request("GET", "/v1/tasks")[1]["data"]}
    model = load_base(server.base)
    registry.register(_adapter(model, "law", LAW, 11).save(server.root / "law-v2"))
    server.complete("law", LONG, 2)  # v1's blocks for the long prompt are in the prefix cache
    status, body = server.request("POST", "/v1/tasks/law@2")
    assert status == 409 and "DELETE /v1/tasks/law" in body["error"]["message"]
    assert server.request("DELETE", "/v1/tasks/law")[0] == 200
    assert server.request("POST", "/v1/tasks/law@2")[1]["version"] == 2
    second = server.complete("law", LONG, 2)
    assert (second["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0  # new weights, new salt
    assert server.complete("law", PROMPT, 8)["token_ids"] != server.expected["law"]
    for ref, status in (("bad name", 400), ("law@x", 400), ("nothing", 404)):
        assert server.request("POST", f"/v1/tasks/{ref.replace(' ', '%20')}")[0] == status, ref
    assert server.request("DELETE", "/v1/tasks/law@2")[0] == 400
    # A servable registry task whose entry is removed (`expert-hub rm`) while it is not resident.
    assert server.request("DELETE", "/v1/tasks/law")[0] == 200
    assert server.request("POST", "/v1/tasks/law@1")[0] == 200
    for name in ("intent", "law"):
        server.complete(name, PROMPT, 2)
    registry.register(_adapter(model, "gone", EXPERTS["gone"], 12).save(server.root / "gone"))
    assert server.request("POST", "/v1/tasks/gone")[0] == 200  # evicts intent (least recently used)
    server.complete("law", PROMPT, 2)
    registry.remove("gone")
    server.complete("intent", PROMPT, 2)  # evicts gone
    status, body = server.request("POST", "/v1/completions", {"model": "gone", "prompt": PROMPT, "max_tokens": 2})
    assert status == 404 and "no longer servable" in body["error"]["message"]
    assert str(registry.root) not in body["error"]["message"]
    _unchanged(server)


def test_tokens_of_disconnected_streams_are_counted(server):
    before = server.counters()
    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=60)
    connection.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "intent", "prompt": PROMPT, "max_tokens": 480, "stream": True, "ignore_eos": True}),
        {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
    )
    response = connection.getresponse()
    assert response.status == 200
    received = [response.readline() for _ in range(6)]  # a few `data:` events and their blank lines
    assert sum(line.startswith(b"data:") for line in received) == 3
    connection.close()  # the client goes away mid-stream
    key = 'expert_hub_task_completion_tokens_total{task="intent"}'
    deadline = time.monotonic() + 30
    while (generated := server.counters().get(key, 0) - before.get(key, 0)) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 3 <= generated < 480


def test_serve_refuses_bad_tasks_and_options_in_one_line(server, tmp_path):
    """Start-up errors: a bad task name, NaN weights, an expert the model lacks, options vLLM refuses."""
    nan = server.root / "nan"
    model = load_base(server.base)
    _adapter(model, "nan", {2: [6]}, 5).save(nan)
    save_file(
        {key: torch.full_like(value, float("nan")) for key, value in load_file(nan / "experts.safetensors").items()},
        nan / "experts.safetensors",
    )
    cases = [
        (["--tasks", f"../x={server.root / 'law'}"], "invalid task name '../x'"),
        (["--tasks", f"bad={nan}"], "holds NaN or infinite values"),
        (["--tasks", f"law={server.root / 'law'},law={server.root / 'intent'}"], "task law is given twice"),
        (["--max-model-len", "100000"], "vLLM refused the server options: User-specified max_model_len (100000)"),
        (["--kv-cache-gb", "0"], "--kv-cache-gb must be positive"),
        (["--enable-expert-parallel"], "--enable-expert-parallel is not supported: vLLM's expert map places"),
        (["--data-parallel-size", "2"], "--data-parallel-size 2 is not supported yet: its replicas route"),
        (["--kv-cache-gb", "0.000001"], "a KV cache of 0.0 MiB holds less than two 512-token sequences"),
        (["--kv-cache-gb", "100000"], "a KV cache of 100000.00 GiB is more than the"),
        (["--ray-address", "auto"], "--ray-address runs replicas: give --replicas N too"),
        (
            ["--replicas", "1", "--max-model-len", "100000"],
            "vLLM refused the server options: User-specified max_model_len",
        ),
    ]

    def refusal(case: tuple[int, tuple[list[str], str]]) -> None:
        port, (options, message) = case
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("expert-hub")),
                "serve",
                "--base",
                server.base,
                "--dtype",
                "float32",
                "--port",
                str(port),
                *options,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and "Traceback" not in result.stderr, (options, result.stderr[-2000:])
        assert last.startswith("error: ") and message in last, (options, last)

    with ThreadPoolExecutor(3) as pool:  # a refusal is mostly one core's imports: three at a time
        list(pool.map(refusal, enumerate(cases, start=8670)))
