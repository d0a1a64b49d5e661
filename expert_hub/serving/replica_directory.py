"""The replicas' directory (`serve --replicas`, `replicas.py`): a named Ray actor where each replica lists its
`expert-hub serve` child, so that the ingress can reach every replica (a Ray Serve handle reaches one replica per
call); where the tasks added or removed at run time are kept, so that a replica started later (a replacement)
serves the same tasks; and where a replica that failed to start says why.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMESPACE = "expert-hub"
DIRECTORY = "expert-hub-replicas"


@dataclass(frozen=True)
class ChildServer:
    """One replica's `expert-hub serve`, as the ingress reaches it for the routes that go to every replica."""

    replica: str
    url: str
    key: str


def auth_header(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def ray_get(reference):
    import ray

    return ray.get(reference)


def replica_directory():
    import ray

    return ray.get_actor(DIRECTORY, namespace=NAMESPACE)


def directory_actor():
    """The `ReplicaDirectory` actor class (Ray imported only here)."""
    import ray

    @ray.remote(num_cpus=0)
    class ReplicaDirectory:
        def __init__(self) -> None:
            self.reset()

        def reset(self) -> None:
            """A new application: no replicas yet, no run-time changes, no failure (a Serve config redeployed)."""
            self.servers: dict[str, ChildServer] = {}
            self.changes: dict[str, tuple[str, str]] = {}  # task name -> (ref, "added" / "removed"), oldest first
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

        def record(self, name: str, ref: str, change: str) -> tuple[str, str] | None:
            """Task `name`'s newest run-time change: `ref` (`law@3`, as the replicas resolved it) added, or removed;
            returns the change it replaces."""
            before = self.changes.pop(name, None)  # the newest change last
            self.changes[name] = (ref, change)
            return before

        def restore(self, name: str, before: tuple[str, str] | None) -> None:
            """Undo `record` (a change no replica made)."""
            self.changes.pop(name, None)
            if before is not None:
                self.changes[name] = before

        def task_changes(self) -> list[tuple[str, str]]:
            return list(self.changes.values())

    return ReplicaDirectory
