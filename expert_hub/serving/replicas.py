"""`expert-hub serve --replicas N`: N expert-hub servers behind one OpenAI-compatible endpoint, on Ray Serve.

Ray Serve runs the replicas, replaces one whose health check fails, and sends each request to a replica that served
its task recently (model multiplexing, the task being the multiplexed model id), spreading a task over more
replicas only when those are busy. expert-hub adds three small pieces:
- `TaskReplica`, a Ray Serve deployment: one `expert-hub serve` (its own engine, bank, residency and host-memory
  tier) as a child process with a key of its own; the replica forwards requests to it, and its health check fails
  when the child is gone;
- `Ingress` (`ingress.py`): the endpoint users call;
- `ReplicaDirectory`, a named Ray actor where each replica lists its child server, so that the ingress can reach
  every replica (a Ray Serve handle reaches one replica per call), and where the tasks added or removed at run time
  are kept, so that a replica started later (a replacement) serves the same tasks.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx

from expert_hub.errors import InvalidInputError

from .serving_state import error_body

APP_NAME = "expert-hub"
NAMESPACE = "expert-hub"
DIRECTORY = "expert-hub-replicas"
HEALTH_CHECK_PERIOD_S = 2.0  # how soon a replica whose server died is noticed (and replaced)
START_TIMEOUT_S = 900.0  # a replica's `expert-hub serve` to /health: a large base loads for minutes


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica runs: `expert-hub serve`'s options (all but where it listens and its key), and the
    address its child listens on (127.0.0.1 on one machine; the node's address in a cluster)."""

    serve_argv: tuple[str, ...]
    tasks_per_replica: int  # the multiplexing LRU: the tasks Ray considers a replica to hold
    listen_on_node_address: bool = False
    split_cpus: bool = False  # on one CPU machine, each replica's engine on its own share of the cores
    ranks: int = 1  # each replica's --tensor-parallel-size: its share of the cores is split between its ranks


@dataclass(frozen=True)
class ChildServer:
    """One replica's `expert-hub serve`, as the ingress reaches it for the routes that go to every replica."""

    replica: str
    url: str
    key: str


def deployments(settings: ReplicaSettings, replicas: int, gpus_per_replica: int, batch: int):
    """The Ray Serve deployment classes, made here so that `ray` is imported only by `serve --replicas`."""
    from ray import serve

    @serve.deployment(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": 0, "num_gpus": gpus_per_replica},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=30,
        max_ongoing_requests=batch,  # a replica with a full batch is busy: a task's next requests may go elsewhere
        graceful_shutdown_timeout_s=30,
    )
    class TaskReplica:
        def __init__(self) -> None:
            context = serve.get_replica_context()
            self.replica = context.replica_tag
            share = _cpu_share(context.rank.local_rank, context.world_size) if settings.split_cpus else None
            try:
                self.child = _start_child(settings, self.replica, share)
            except RuntimeError as error:
                replica_directory().failed.remote(str(error))  # for the one line `serve` prints
                raise
            self.client = httpx.AsyncClient(base_url=self.child.server.url, headers=auth_header(self.child.server.key))
            _replay_task_changes(self.child.server)
            replica_directory().register.remote(self.child.server)

        @serve.multiplexed(max_num_models_per_replica=settings.tasks_per_replica)
        async def _task(self, name: str) -> str:
            """Nothing to load here (the child loads a task at its first request): this tells Ray Serve which tasks
            this replica has served lately, so that their next requests come here."""
            return name

        async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes):
            """The child's response: first `{"status", "headers"}`, then the body in the chunks the child sends. A
            5xx from a child whose engine has died (its /health fails) becomes a 503: retrying elsewhere helps."""
            if task := serve.get_multiplexed_model_id():
                await self._task(task)
            request = self.client.build_request(
                method, path, params=query.decode("latin-1"), headers=headers, content=body, timeout=None
            )
            response = await self.client.send(request, stream=True)
            try:
                if response.status_code >= 500 and not await self._healthy():
                    yield {"status": 503, "headers": [("content-type", "application/json")]}
                    yield error_body(503, f"the engine of replica {self.replica} stopped; retry")
                    return
                yield {"status": response.status_code, "headers": response.headers.multi_items()}
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        async def _healthy(self) -> bool:
            try:
                await self.check_health()
            except (RuntimeError, httpx.HTTPError):
                return False
            return True

        async def check_health(self) -> None:
            if (code := self.child.process.poll()) is not None:
                raise RuntimeError(f"replica {self.replica}'s server exited ({code}): {self.child.last_line()}")
            response = await self.client.get("/health", timeout=HEALTH_CHECK_PERIOD_S * 5)
            if response.status_code != 200:
                raise RuntimeError(f"replica {self.replica}'s server answered /health with {response.status_code}")

        def __del__(self) -> None:
            child = getattr(self, "child", None)
            if child is not None:
                child.stop()
                with contextlib.suppress(Exception):  # Ray itself may be stopping
                    replica_directory().unregister.remote(self.replica)

    return TaskReplica


class _Child:
    """A replica's `expert-hub serve` process: its output goes on to the replica's log, its last lines are kept
    for the error that says why it stopped."""

    def __init__(self, process: subprocess.Popen, server: ChildServer) -> None:
        self.process, self.server = process, server
        self._tail: collections.deque[str] = collections.deque(maxlen=20)
        threading.Thread(target=self._pass_output_on, daemon=True).start()

    def _pass_output_on(self) -> None:
        for line in self.process.stdout:
            sys.stdout.write(line)
            if line.strip():
                self._tail.append(line.strip())

    def last_line(self) -> str:
        return next(
            (line for line in reversed(self._tail) if line.startswith("Error")), self._tail[-1] if self._tail else ""
        )

    def stop(self) -> None:
        """SIGTERM (vLLM's processes stop with it); after 30 s, SIGKILL to whatever of its process group is left
        (vLLM's engine and workers included, which outlive a server that died first)."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def _start_child(settings: ReplicaSettings, replica: str, cpus: list[int] | None) -> _Child:
    """Start this replica's `expert-hub serve` and wait for its /health; a server that exits first is an error
    naming its last line (Ray Serve then reports the replica as failed to start)."""
    host = _node_address() if settings.listen_on_node_address else "127.0.0.1"
    port, key = _free_port(host), secrets.token_urlsafe(32)
    env = dict(os.environ)
    if cpus is not None:  # vLLM's binding: one group of cores per rank
        groups = [
            cpus[rank * len(cpus) // settings.ranks : (rank + 1) * len(cpus) // settings.ranks]
            for rank in range(settings.ranks)
        ]
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, group)) for group in groups)
    argv = [sys.executable, "-m", "expert_hub.cli", "serve", *settings.serve_argv]
    env["EXPERT_HUB_API_KEY"] = key  # not on the command line, which every local user can read
    process = subprocess.Popen(
        [*argv, "--host", host, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=lambda: _die_with_parent(cpus),
        start_new_session=True,  # a process group of its own: `stop` ends vLLM's processes with it
    )
    child = _Child(process, ChildServer(replica, f"http://{host}:{port}", key))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (code := process.poll()) is not None:
            raise RuntimeError(f"expert-hub serve exited ({code}): {child.last_line()}")
        try:
            if httpx.get(f"{child.server.url}/health", timeout=5).status_code == 200:
                return child
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    child.stop()
    raise RuntimeError(f"expert-hub serve did not start in {START_TIMEOUT_S:.0f} s: {child.last_line()}")


def _die_with_parent(cpus: list[int] | None) -> None:
    """In the child, before it runs: SIGTERM when the replica's process dies (even by SIGKILL), so that no server
    outlives its replica; and the replica's share of the cores."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def _cpu_share(rank: int, replicas: int) -> list[int]:
    """Replica `rank`'s cores: the allowed cores split evenly (`serve` refuses more replicas than cores)."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[rank * len(cores) // replicas : (rank + 1) * len(cores) // replicas]


def _replay_task_changes(server: ChildServer) -> None:
    """Add (or remove) on this replica's server the tasks added (or removed) at run time before it started."""
    import ray

    for name, change in ray.get(replica_directory().task_changes.remote()):
        method = "POST" if change == "added" else "DELETE"
        httpx.request(method, f"{server.url}/v1/tasks/{name}", headers=auth_header(server.key), timeout=None)


def auth_header(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def replica_directory():
    import ray

    return ray.get_actor(DIRECTORY, namespace=NAMESPACE)


def directory_actor():
    """The `ReplicaDirectory` actor class (Ray imported only here)."""
    import ray

    @ray.remote(num_cpus=0)
    class ReplicaDirectory:
        def __init__(self) -> None:
            self.servers: dict[str, ChildServer] = {}
            self.changes: dict[str, str] = {}  # task name or reference -> "added" / "removed", in order
            self.failure: str | None = None  # why the last replica that failed to start did

        def failed(self, reason: str) -> None:
            self.failure = reason

        def last_failure(self) -> str | None:
            return self.failure

        def register(self, server: ChildServer) -> None:
            self.servers[server.replica] = server

        def unregister(self, replica: str) -> None:
            self.servers.pop(replica, None)

        def children(self) -> list[ChildServer]:
            return list(self.servers.values())

        def record(self, name: str, change: str) -> None:
            self.changes.pop(name, None)  # the newest change last
            self.changes[name] = change

        def task_changes(self) -> list[tuple[str, str]]:
            return list(self.changes.items())

    return ReplicaDirectory


def _private_ray_token() -> None:
    """Ray's own token authentication, with a token of this run's (unless the user set Ray's): Ray binds its gRPC
    ports on every interface, and without a token anyone who reaches them can run code in the cluster. Ray would
    otherwise write a token into ~/.ray for every later Ray to share."""
    if "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ:
        os.environ |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def build_application(
    settings: ReplicaSettings,
    replicas: int,
    gpus_per_replica: int,
    batch: int,
    api_key: str | None,
    public_metrics: bool,
):
    """The Ray Serve application: the ingress in front of `replicas` task replicas. The replica directory is
    created here, detached: a Serve config (a RayService) builds the application in a Ray task that then ends."""
    from .ingress import ingress_deployment

    directory_actor().options(name=DIRECTORY, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()
    replica = deployments(settings, replicas, gpus_per_replica, batch)
    return ingress_deployment(api_key, public_metrics).bind(replica.bind())


def application(args: dict):
    """The application for a Serve config, such as a KubeRay RayService's `serveConfigV2`: `import_path:
    expert_hub.serving.replicas:application`, with `args`: `options` (the `expert-hub serve` options each replica
    runs, a list), `replicas`, and optionally `gpus_per_replica` (1), `tasks_per_replica` (8), `max_num_seqs`
    (256) and `public_metrics`. The API key is `EXPERT_HUB_API_KEY` in the cluster's environment."""
    settings = ReplicaSettings(
        tuple(args["options"]), int(args.get("tasks_per_replica", 8)), listen_on_node_address=True
    )
    return build_application(
        settings,
        int(args["replicas"]),
        int(args.get("gpus_per_replica", 1)),
        int(args.get("max_num_seqs", 256)),
        os.environ.get("EXPERT_HUB_API_KEY"),
        bool(args.get("public_metrics", False)),
    )


def run_replicas(
    settings: ReplicaSettings,
    replicas: int,
    gpus_per_replica: int,
    batch: int,
    host: str,
    port: int,
    api_key: str | None,
    public_metrics: bool,
    ray_address: str | None,
) -> None:
    """Start (or join, with `ray_address`) Ray, the replicas and the ingress on `host:port`; serve until SIGINT or
    SIGTERM, then remove the application (and stop the Ray instance this started)."""
    local = ray_address is None
    if local:
        _private_ray_token()  # before Ray is imported: it reads its settings once
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise InvalidInputError("serve --replicas runs on Ray Serve: pip install 'expert-hub[ray]'") from error

    ray.init(
        address=ray_address or "local",  # "local": a Ray of its own, never one that `ray start` left running
        namespace=NAMESPACE,
        include_dashboard=False,
        **({"_node_ip_address": "127.0.0.1"} if local else {}),
    )
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_application(settings, replicas, gpus_per_replica, batch, api_key, public_metrics)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as error:
            reason = ray.get(replica_directory().last_failure.remote()) or str(error).splitlines()[0]
            raise InvalidInputError(f"the replicas did not start: {reason}") from error
        print(f"expert-hub: {replicas} replica(s) serving on http://{host}:{port}", flush=True)
        while not stopping.wait(1.0):
            pass
    finally:
        if local:
            serve.shutdown()
        else:  # the cluster goes on: only this application and its directory go
            serve.delete(APP_NAME)
            with contextlib.suppress(ValueError):
                ray.kill(replica_directory())
        ray.shutdown()
