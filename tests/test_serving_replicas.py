"""`expert-hub serve --replicas 2` on Ray Serve: two replicas of a tiny qwen3_moe (eager, one core each) behind one
endpoint, started as users start it.

Every task's tokens through the endpoint are plain vLLM's on its merged checkpoint, alone and mixed; a task's
requests stay on one replica and two hot tasks go to two; a task added at run time reaches every replica (and a
replacement replica); a replica whose engine is killed fails its requests in flight with an error, never a hang,
while the other replica serves, and is replaced; the API key guards the endpoint, Ray listens on the loopback
interface only, and SIGTERM leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from expert_hub.registry import Registry

from .serving_client import API_KEY, CONTEXT, LONG, start_server
from .serving_oracle import make_tasks, plain_vllm_tokens, profile_tasks

pytestmark = pytest.mark.slow  # vLLM servers on Ray Serve: `make test-fast` leaves it out

PORT = 8671
PROMPTS = ["Hello world, this is", "The quick brown fox jumps"]
AUTO_PROMPTS = {"law": "abcdefghij" * 3, "intent": "0123456789" * 3}  # what each task's requests look like
TASKS = {
    "law": {0: [3, 7], 1: [3], 2: [1, 2], 3: [7]},
    "intent": {0: [3, 9], 1: [4], 3: [0, 15]},
    "hot1": {1: [5], 2: [6]},  # the affinity test's: asked nowhere else
    "hot2": {0: [1], 3: [2]},
    "extra": {1: [8, 9], 2: [3]},  # registered, not served at start: added at run time
}
AUTO_HEADER = {"x-expert-task": "auto"}
REPLACED_WITHIN_S = 300  # a killed replica's engine to a replacement serving again, on this 2-core machine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    base, adapters, merged = make_tasks("qwen3_moe", root, TASKS, max_position_embeddings=CONTEXT)
    profile_tasks(base, adapters, AUTO_PROMPTS)  # law's requests are letters, intent's digits: they route apart
    Registry(root / "registry").register(adapters["extra"])
    served = ",".join(f"{name}={adapters[name]}" for name in TASKS if name != "extra")
    options = ["--replicas", "2", "--enforce-eager"]
    server = start_server(root, base, served, root / "registry", PORT, options, max_model_len=CONTEXT)
    _wait_for_replicas(server, 2, 300)
    checked = {name: merged[name] for name in ("law", "intent", "extra")}
    server.oracle = plain_vllm_tokens(root, checked, [(prompt, 8) for prompt in PROMPTS + list(AUTO_PROMPTS.values())])
    yield server
    if server.process.poll() is None:
        server.process.kill()


def _wait_for_replicas(server, count: int, seconds: float, other_than: list[str] = ()) -> list[str]:
    """The replicas serving once `count` of them answer, and they are not all of `other_than` (replaced ones)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, listing = server.request("GET", "/v1/tasks")
        replicas = [replica["replica"] for replica in listing["replicas"]] if status == 200 else []
        if len(replicas) == count and not set(replicas) <= set(other_than):
            return replicas
        time.sleep(1)
    pytest.fail(f"{count} replicas were not serving within {seconds} s")


def _requests_per_replica(server, task: str) -> dict[str, float]:
    """The task's requests each replica's server counted (`/metrics`, labelled by replica)."""
    counts = {}
    for series, value in server.counters().items():
        name, _, labels = series.partition("{")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if name == "expert_hub_task_requests_total" and labels["task"] == task:
            counts[labels["replica"]] = value
    return counts


def _tokens(server, task: str, prompt: str) -> list[int]:
    return server.complete(task, prompt, 8)["token_ids"]


def test_every_replica_runs_serve_with_the_commands_other_options(run_cli, tmp_path, monkeypatch):
    """What `serve --replicas` hands each replica: every option but where to listen, the key and Ray's own, with
    local paths made absolute (replicas run in Ray's directories); the key and the replicas' shape go to Ray."""
    from expert_hub.serving import replicas

    base, adapters, _ = make_tasks("qwen3_moe", tmp_path, {"law": TASKS["law"]})
    started = {}
    monkeypatch.setattr(replicas, "run_replicas", lambda *args: started.update(args=args))
    monkeypatch.setattr(os, "environ", os.environ.copy())  # what vLLM and Ray set in-process stays in this test
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        *("serve", "--base", "base", "--tasks", "law=adapter-law", "--replicas", "2", "--api-key", "K"),
        *("--port", "9001", "--dtype", "float32", "--task-wait-timeout", "5", "--allow-pull", "acme/*"),
        *("--public-metrics", "--max-num-seqs", "16", "--enforce-eager"),
    )
    assert code == 0, err
    settings, config, gpus, batch = started["args"]
    assert list(settings.serve_argv) == [
        *("--base", str(base), "--tasks", f"law={adapters['law']}", "--dtype", "float32"),
        *("--task-wait-timeout", "5.0", "--allow-pull", "acme/*", "--max-num-seqs", "16", "--enforce-eager"),
    ]
    assert (config.replicas, gpus, batch) == (2, 0, 16)
    front = (config.host, config.port, config.api_key, config.public_metrics, config.ray_address)
    assert front == ("127.0.0.1", 9001, "K", True, None)
    assert settings.tasks_per_replica == 1 and settings.split_cpus and not settings.listen_on_node_address
    cores = len(os.sched_getaffinity(0))
    for options in (["--replicas", str(cores + 1)], ["--replicas", str(cores), "--tensor-parallel-size", "2"]):
        code, _, err = run_cli("serve", "--base", "base", *options)
        assert code == 1 and f"CPU cores and {cores} are available" in err.strip().splitlines()[-1], err


def test_a_tasks_requests_stay_on_one_replica_and_two_hot_tasks_go_to_two(cluster):
    _tokens(cluster, "hot1", PROMPTS[0])
    time.sleep(5)  # the replica tells Ray Serve's routers which task it now holds
    for _ in range(4):
        _tokens(cluster, "hot1", PROMPTS[0])
    first = _requests_per_replica(cluster, "hot1")
    assert list(first.values()) == [5.0], first  # light load: one replica served them all
    _tokens(cluster, "hot2", PROMPTS[0])  # to the replica holding fewer tasks: the other one
    time.sleep(5)
    with ThreadPoolExecutor(4) as clients:
        list(clients.map(lambda task: _tokens(cluster, task, PROMPTS[1]), ["hot1", "hot2"] * 6))
    one, two = _requests_per_replica(cluster, "hot1"), _requests_per_replica(cluster, "hot2")
    assert len(one) == 1 and len(two) == 1 and one.keys() != two.keys(), (one, two)
    assert sum(one.values()) == 11 and sum(two.values()) == 7


def test_every_tasks_tokens_equal_its_merged_checkpoints_alone_and_mixed(cluster):
    names = ["law", "intent"]
    for name in names:
        for prompt, expected in zip(PROMPTS, cluster.oracle[name]):
            assert _tokens(cluster, name, prompt) == expected["token_ids"], name
    mixed = [(name, index) for name in names for index in range(len(PROMPTS))] * 4
    with ThreadPoolExecutor(8) as clients:
        answers = list(clients.map(lambda job: (job, _tokens(cluster, job[0], PROMPTS[job[1]])), mixed))
    wrong = [job for job, tokens in answers if tokens != cluster.oracle[job[0]][job[1]]["token_ids"]]
    assert not wrong, wrong


def test_streams_and_auto_routing_pass_through(cluster):
    body = {"model": "law", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stream": True}
    request = urllib.request.Request(
        cluster.url + "/v1/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and {json.loads(event)["model"] for event in events[:-1]} == {"law"}
    streamed = "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])
    status, answer = cluster.request("POST", "/v1/completions", body | {"stream": False})
    assert status == 200 and streamed == answer["choices"][0]["text"]
    for index, (task, prompt) in enumerate(AUTO_PROMPTS.items(), start=len(PROMPTS)):
        request = urllib.request.Request(
            cluster.url + "/v1/completions",
            json.dumps(
                {"model": "auto", "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
            ).encode(),
            {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
            assert response.headers["x-expert-task-chosen"] == task == answer["model"]
        assert answer["choices"][0]["token_ids"] == cluster.oracle[task][index]["token_ids"]
    status, answer = cluster.request("POST", "/v1/completions", {"model": "auto", "prompt": "", "max_tokens": 1})
    assert status == 400 and "the prompt is empty" in answer["error"]["message"]  # the replica's own refusal
    status, answer = cluster.request("POST", "/v1/completions", {"model": "law", "prompt": "x"}, headers=AUTO_HEADER)
    assert status == 400 and "names several tasks" in answer["error"]["message"]
    status, answer = cluster.request("GET", "/v1/tasks?limit=0")
    assert status == 400 and "limit must be between 1 and 1000" in answer["error"]["message"]


def test_a_task_added_at_run_time_reaches_every_replica(cluster):
    status, answer = cluster.request("POST", "/v1/tasks/extra")
    assert status == 200 and len(answer["replicas"]) == 2, answer
    listing = cluster.request("GET", "/v1/tasks")[1]
    extra = next(task for task in listing["data"] if task["id"] == "extra")
    assert [each["resident"] for each in extra["replicas"].values()] == [True, True]
    assert _tokens(cluster, "extra", PROMPTS[0]) == cluster.oracle["extra"][0]["token_ids"]
    status, answer = cluster.request("POST", "/v1/tasks/nosuchtask")
    assert status == 404 and "nosuchtask" in answer["error"]["message"]


def test_a_replica_whose_engine_dies_fails_its_requests_and_is_replaced(cluster):
    """Two long requests are on their replicas (where Ray Serve put them) when the engine doing the most work is
    killed: the requests on its replica fail with a 503 that says to retry, never a hang; those on the other replica
    finish; the other replica serves meanwhile, and the dead one is replaced."""
    before = _wait_for_replicas(cluster, 2, 10)
    long = {"prompt": PROMPTS[0], "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "return_token_ids": True}

    def ask(task: str) -> tuple[int, object]:
        return cluster.request("POST", "/v1/completions", {"model": task, **long})

    with ThreadPoolExecutor(2) as clients:
        answers = {task: clients.submit(ask, task) for task in ("hot1", "hot2")}
        placed = _placement(cluster, answers)
        engine = _busiest_engine(cluster)
        assert not any(answer.done() for answer in answers.values()), "a request ended before the kill"
        killed = time.monotonic()
        engine.kill()
        results = {task: answer.result(timeout=300) for task, answer in answers.items()}
    print("placed:", placed, "answers:", {task: status for task, (status, _) in results.items()})
    dead = {placed[task] for task, (status, _) in results.items() if status != 200}
    assert len(dead) == 1, (placed, results)
    for task, (status, answer) in results.items():
        if placed[task] in dead:  # the ingress's or the replica's 503, whichever saw the engine gone first
            assert status == 503 and answer["error"]["message"].endswith("retry"), (task, answer)
        else:
            assert status == 200 and len(answer["choices"][0]["token_ids"]) == LONG, (task, answer)
    for _ in range(3):  # the other replica serves meanwhile (a client retries a 503, as it says)
        assert _tokens_retrying(cluster, "hot1", PROMPTS[0]) and _tokens_retrying(cluster, "hot2", PROMPTS[0])
    now = _wait_for_replicas(cluster, 2, REPLACED_WITHIN_S, other_than=before)
    print(f"replaced in {time.monotonic() - killed:.0f} s")
    assert not dead & set(now) and len(set(before) & set(now)) == 1, (before, now, dead)
    for task in ("hot1", "hot2"):
        assert _tokens(cluster, task, PROMPTS[0])
    assert _tokens(cluster, "extra", PROMPTS[0]) == cluster.oracle["extra"][0]["token_ids"]  # replayed
    listing = cluster.request("GET", "/v1/tasks")[1]
    assert not any(task["in_flight"] or task["waiting"] for task in listing["data"])


def _tokens_retrying(server, task: str, prompt: str, tries: int = 10) -> list[int]:
    """A completion's tokens, asked again after a second while the answer is a 503 (a replica being replaced)."""
    body = {"model": task, "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    for _ in range(tries):
        status, answer = server.request("POST", "/v1/completions", body)
        if status != 503:
            assert status == 200, answer
            return answer["choices"][0]["token_ids"]
        time.sleep(1)
    pytest.fail(f"{task}: a 503 {tries} times in a row: {answer}")


def _placement(server, answers: dict) -> dict[str, str]:
    """The replica each task's request is on (in flight or waiting for its task), once all of them are."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answered = {task: answer.result() for task, answer in answers.items() if answer.done()}
        assert not answered, f"answered before any engine was killed: {answered}"
        placed = {
            task["id"]: replica
            for task in server.request("GET", "/v1/tasks")[1]["data"]
            if task["id"] in answers
            for replica, here in task["replicas"].items()
            if here["in_flight"] or here["waiting"]
        }
        if placed.keys() == answers.keys():
            return placed
        time.sleep(0.2)
    pytest.fail(f"the requests were not on any replica within 60 s: {placed}")


def _busiest_engine(server) -> psutil.Process:
    """The vLLM engine of the replica server whose model worker computed the most over half a second: one
    generating tokens. Measured after a quiet second: vLLM's engine and worker poll each other busily for a second
    after any call between them (and `GET /v1/tasks` reaches every replica's worker), so until then an idle
    replica's processes burn as much CPU as a busy one's."""
    time.sleep(1.2)
    processes = psutil.Process(server.process.pid).children(recursive=True)
    servers = [process for process in processes if "expert_hub.cli" in " ".join(_cmdline(process))]
    trees = {replica: [replica, *_descendants(replica)] for replica in servers}
    workers = {replica: [p for p in tree if _name(p).startswith("VLLM::Worker")] for replica, tree in trees.items()}
    start = {replica: sum(map(_cpu_seconds, workers[replica])) for replica in trees}
    time.sleep(0.5)
    used = {replica: sum(map(_cpu_seconds, workers[replica])) - start[replica] for replica in trees}
    busiest = max(used, key=used.get, default=None)
    engines = [p for p in trees.get(busiest, []) if _name(p).startswith("VLLM::EngineCo")]
    assert len(engines) == 1 and used[busiest] > 0.1, (used, _process_tree(server))
    return engines[0]


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cpu_seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.NoSuchProcess:
        return []


def _process_tree(server) -> list[tuple[int, int, str]]:
    """(pid, parent pid, name) of the server's processes: what a failure shows."""
    processes = psutil.Process(server.process.pid).children(recursive=True)
    return [(process.pid, process.ppid(), _name(process)) for process in processes]


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def test_the_key_guards_the_endpoint_and_rays_ports_need_rays_token(cluster):
    body = {"model": "law", "prompt": "x", "max_tokens": 1}
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/tasks"), ("GET", "/metrics"), ("GET", "/v1/models")):
        for key in (None, "wrong"):
            status, answer = cluster.request(method, path, body if method == "POST" else None, key=key)
            assert status == 401 and answer["error"]["code"] == 401, (method, path, key)
    for method in ("POST", "DELETE"):
        assert cluster.request(method, "/v1/tasks/law", key=None)[0] == 401
    assert cluster.request("GET", "/health", key=None)[0] == 200
    preflight = {"origin": "http://example.com", "access-control-request-method": "POST"}
    assert cluster.request("OPTIONS", "/v1/completions", key=None, headers=preflight)[0] != 401
    processes = psutil.Process(cluster.process.pid).children(recursive=True)
    listening = {
        (process.name(), connection.laddr.ip, connection.laddr.port)
        for process in processes
        for connection in _connections(process)
        if connection.status == psutil.CONN_LISTEN
    }
    assert ("ray::ProxyActor", "127.0.0.1", PORT) in listening  # the endpoint, on --host
    assert not any(port == 8265 for _, _, port in listening)  # no dashboard
    servers = [p for p in processes if "expert_hub.cli" in " ".join(p.cmdline())]
    assert len(servers) == 2 and all(ip == "127.0.0.1" for p in servers for _, ip, _ in _listening(p))
    # Ray binds its own gRPC ports on every interface: they refuse whoever lacks this run's token
    gcs = next(process for process in processes if process.name() == "gcs_server")
    port = next(port for _, _, port in _listening(gcs))
    assert _gcs_answers(_outside_address(), port, token=None) == "UNAUTHENTICATED"
    assert _gcs_answers("127.0.0.1", port, token=gcs.environ()["RAY_AUTH_TOKEN"]) == "OK"


def _listening(process: psutil.Process) -> set[tuple[str, str, int]]:
    return {
        (process.name(), connection.laddr.ip, connection.laddr.port)
        for connection in _connections(process)
        if connection.status == psutil.CONN_LISTEN
    }


def _connections(process: psutil.Process):
    try:
        return process.net_connections(kind="inet")
    except psutil.NoSuchProcess:
        return []


def _outside_address() -> str:
    """This machine's address on a network interface other than the loopback one."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    pytest.skip("this machine has no network interface besides the loopback one")


def _gcs_answers(host: str, port: int, token: str | None) -> str:
    """The status of a read-only call to Ray's GCS (its list of nodes), with or without a token."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            return error.code().name
    return "OK"


def test_sigterm_stops_every_process(cluster):
    everything = psutil.Process(cluster.process.pid).children(recursive=True)
    assert len(everything) > 6  # Ray's processes, two servers and their engines
    cluster.process.send_signal(signal.SIGTERM)
    cluster.process.wait(timeout=120)
    _, alive = psutil.wait_procs(everything, timeout=120)
    assert not alive, [process.name() for process in alive]
    assert cluster.process.returncode == 0
