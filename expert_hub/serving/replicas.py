"""`expert-hub serve --replicas N`: N expert-hub servers behind one OpenAI-compatible endpoint, on Ray Serve.

Ray Serve runs the replicas, replaces one whose health check fails, and sends each request to a replica that served
its task recently (model multiplexing, the task being the multiplexed model id), spreading a task over more
replicas only when those are busy. expert-hub adds three small pieces:
- `TaskReplica`, a Ray Serve deployment: one `expert-hub serve` (its own engine, bank, residency and host-memory
  tier) as a child process with a key of its own; the replica forwards requests to it, and its health check fails
  when the child is gone;
- `Ingress` (`ingress.py`): the endpoint users call;
- `ReplicaDirectory` (`replica_directory.py`), a named Ray actor where replicas list their servers.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from expert_hub.errors import InvalidInputError

from .config import ServeConfig
from .replica_directory import (
    DIRECTORY,
    NAMESPACE,
    ChildServer,
    auth_header,
    directory_actor,
    ray_get,
    replica_directory,
)
from .serving_state import error_body

APP_NAME = "expert-hub"
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
    cwd: str | None = None  # where relative paths in `serve_argv` are resolved (one machine: the command's own)
    ranks: int = 1  # each replica's --tensor-parallel-size: its share of the cores is split between its ranks


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
            except (RuntimeError, OSError) as error:
                replica_directory().failed.remote(str(error))  # for the one line `serve` prints
                raise
            self.client = httpx.AsyncClient(base_url=self.child.server.url, headers=auth_header(self.child.server.key))
            try:  # listed first, so that no run-time change made meanwhile passes it by; adds are idempotent
                ray_get(replica_directory().register.remote(self.child.server))
                _replay_task_changes(self.child.server)
            except BaseException:
                self.__del__()
                raise

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
                with contextlib.suppress(Exception):  # Ray itself may be stopping
                    replica_directory().unregister.remote(self.replica)
                child.stop()

    return TaskReplica


class _Child:
    """A replica's `expert-hub serve` process: its output goes on to the replica's log, its last lines are kept
    for the error that says why it stopped."""

    def __init__(self, process: subprocess.Popen[str], server: ChildServer) -> None:
        self.process, self.server = process, server
        self._tail: collections.deque[str] = collections.deque(maxlen=20)
        threading.Thread(target=self._pass_output_on, daemon=True).start()

    def _pass_output_on(self) -> None:
        assert self.process.stdout is not None  # started with stdout=PIPE (`_start_child`)
        for line in self.process.stdout:
            sys.stdout.write(line)
            if line.strip():
                self._tail.append(line.strip())

    def last_line(self) -> str:
        return next(
            (line for line in reversed(self._tail) if line.startswith("error:")), self._tail[-1] if self._tail else ""
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
        groups = [_part(cpus, rank, settings.ranks) for rank in range(settings.ranks)]
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, group)) for group in groups)
    argv = [sys.executable, "-m", "expert_hub.cli", "serve", *settings.serve_argv]
    env["EXPERT_HUB_API_KEY"] = key  # not on the command line, which every local user can read
    libc = ctypes.CDLL(None)  # loaded here: the forked child, in a threaded process, only calls it
    process = subprocess.Popen(
        [*argv, "--host", host, "--port", str(port)],
        cwd=settings.cwd if settings.cwd and os.path.isdir(settings.cwd) else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=lambda: _die_with_parent(libc, cpus),
        start_new_session=True,  # a process group of its own: `stop` ends vLLM's processes with it
    )
    child = _Child(process, ChildServer(replica, f"http://{host}:{port}", key))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (code := process.poll()) is not None:
            child.stop()  # vLLM's processes, if it had started them
            raise RuntimeError(f"expert-hub serve exited ({code}): {child.last_line()}")
        try:
            if httpx.get(f"{child.server.url}/health", timeout=5).status_code == 200:
                return child
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    child.stop()
    raise RuntimeError(f"expert-hub serve did not start in {START_TIMEOUT_S:.0f} s: {child.last_line()}")


def _die_with_parent(libc, cpus: list[int] | None) -> None:
    """In the child, before it runs: SIGTERM when the replica's process dies (even by SIGKILL), so that no server
    outlives its replica; and the replica's share of the cores."""
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def _cpu_share(rank: int, replicas: int) -> list[int]:
    """Replica `rank`'s cores: the allowed cores split evenly (`serve` refuses more replicas than cores). A
    replacement started before the replica it replaces has stopped gets the next rank, so ranks wrap around."""
    return _part(sorted(os.sched_getaffinity(0)), rank % replicas, replicas)


def _part(items: list[int], index: int, parts: int) -> list[int]:
    """Part `index` of `items` cut into `parts` even runs."""
    return items[index * len(items) // parts : (index + 1) * len(items) // parts]


def _replay_task_changes(server: ChildServer) -> None:
    """Add (or remove) on this replica's server the tasks added (or removed) at run time, each as last changed."""
    for ref, change in ray_get(replica_directory().task_changes.remote()):
        method = "POST" if change == "added" else "DELETE"
        answer = httpx.request(method, f"{server.url}/v1/tasks/{ref}", headers=auth_header(server.key), timeout=None)
        if answer.status_code >= 400 and answer.status_code != 404:
            print(f"expert-hub: replica {server.replica} could not {method} task {ref}: {answer.text}", flush=True)


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def private_ray_token() -> None:
    """Ray's own token authentication, with a token of this run's (unless the user set Ray's): Ray binds its gRPC
    ports on every interface, and without a token anyone who reaches them can run code in the cluster. Ray would
    otherwise write a token into ~/.ray for every later Ray to share. Ray reads this once, when it is imported
    (vLLM's configuration imports it too): call this first."""
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

    directory = directory_actor().options(name=DIRECTORY, namespace=NAMESPACE, lifetime="detached", get_if_exists=True)
    ray_get(directory.remote().reset.remote())
    replica = deployments(settings, replicas, gpus_per_replica, batch)
    return ingress_deployment(api_key, public_metrics).bind(replica.bind())


def application(args: dict):
    """The application for a Serve config, such as a KubeRay RayService's `serveConfigV2`: `import_path:
    expert_hub.serving.replicas:application`, with `args`: `options` (the `expert-hub serve` options each replica
    runs, a list), `replicas`, and optionally `gpus_per_replica` (1), `tasks_per_replica` (8), `max_num_seqs`
    (256) and `public_metrics`. The API key is `EXPERT_HUB_API_KEY` in the cluster's environment."""
    options = [str(option) for option in args["options"]]
    if front := [option for option in options if option.split("=")[0] in ServeConfig.front_flags()]:
        raise ValueError(f"{front[0]} is the application's, not each replica's: remove it from `options`")
    settings = ReplicaSettings(tuple(options), int(args.get("tasks_per_replica", 8)), listen_on_node_address=True)
    return build_application(
        settings,
        int(args["replicas"]),
        int(args.get("gpus_per_replica", 1)),
        int(args.get("max_num_seqs", 256)),
        os.environ.get("EXPERT_HUB_API_KEY"),
        bool(args.get("public_metrics", False)),
    )


def run_replicas(settings: ReplicaSettings, config: ServeConfig, gpus_per_replica: int, batch: int) -> None:
    """Start (or join, with `config.ray_address`) Ray, `config.replicas` replicas and the ingress on `config.host`
    and `config.port`; serve until SIGINT or SIGTERM, then remove the application (and stop the Ray instance this
    started). Call `private_ray_token` first, before anything imports Ray, for a Ray of its own."""
    host, port, replicas, ray_address = config.host, config.port, config.replicas, config.ray_address
    assert replicas is not None  # `serve` runs replicas only when given --replicas
    local = ray_address is None
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise InvalidInputError("serve --replicas runs on Ray Serve: pip install 'expert-hub[ray]'") from error

    node_address: dict[str, Any] = {"_node_ip_address": "127.0.0.1"} if local else {}
    ray.init(
        address=ray_address or "local",  # "local": a Ray of its own, never one that `ray start` left running
        namespace=NAMESPACE,
        include_dashboard=False,
        **node_address,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # as SIGINT: stop, whether starting or serving
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_application(settings, replicas, gpus_per_replica, batch, config.api_key, config.public_metrics)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as error:
            reason = ray.get(replica_directory().last_failure.remote()) or str(error).splitlines()[0]
            raise InvalidInputError(f"the replicas did not start: {reason}") from error
        print(f"expert-hub: {replicas} replica(s) serving on http://{host}:{port}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if local:
            serve.shutdown()
        else:  # the cluster goes on: only this application and its directory go
            serve.delete(APP_NAME)
            with contextlib.suppress(ValueError):
                ray.kill(replica_directory())
        ray.shutdown()
