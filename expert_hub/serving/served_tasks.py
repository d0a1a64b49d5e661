"""A servable task as the front end knows it: its files, its experts per layer, its private key.

Each servable task has a private key, random and never sent to clients: the worker tags a request's tokens with a
task only when the request carries that key (`bank.TASK_ARG`), and the task's prefix-cache salt is derived from it.
Clients therefore can neither run a task's experts without naming the task nor reach its KV blocks. A task added
again after a DELETE gets a new key, so blocks cached for an earlier version are never reused. Which tasks are
resident, and who waits for theirs, is `manager.py`'s business.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from expert_hub.adapter import AdapterHeader
from expert_hub.auto_routing import RoutingProfile
from expert_hub.checkpoint import checkpoint_fingerprint
from expert_hub.errors import ExpertHubError, InvalidInputError
from expert_hub.models import ModelSummary


class TaskError(ExpertHubError):
    """A task request that cannot be met; `status` is the HTTP status to answer with, `retry_after` the seconds a
    client should wait before trying again (a 503's `Retry-After`)."""

    def __init__(self, message: str, status: int, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass
class Task:
    name: str
    directory: Path  # a verified registry object or an adapter directory
    nbytes: int
    experts_per_layer: dict[int, int]  # layer index -> how many of its experts the task replaces
    version: int | None = None  # the registry version, None for an adapter directory
    sha256: dict[str, str] | None = None  # a registry task's recorded file hashes, checked at every load
    profile: RoutingProfile | None = None  # how the base routes its prompts: a candidate for auto routing
    base_checked: bool = False  # its recorded base fingerprint was compared with the served weights
    key: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)

    def cache_salt(self, client_salt: str | None = None) -> str:
        """The task's prefix-cache namespace: unforgeable, and a client's own salt only ever splits it further."""
        material = self.key if client_salt is None else f"{self.key}\0{client_salt}"
        return "expert-hub-" + hashlib.sha256(material.encode()).hexdigest()[:32]


def adapter_task(
    name: str, directory: Path, model: ModelSummary, version: int | None = None, sha256: dict[str, str] | None = None
) -> Task:
    """A servable task from an adapter directory, checked against the served model before anything is loaded.

    Refused: tasks that trained more than routed experts, experts or shapes the model does not have, and a routing
    profile that is not one of the model's. The weights of an adapter directory are read now, to refuse any that are
    not finite floats; a registry task's (`sha256` given) are hashed and checked by the worker at every load, from
    the bytes it loads, so adding one at run time reads each byte once.
    """
    header = AdapterHeader.read(directory)
    if header.selection.shared_experts or header.selection.non_expert_modules:
        raise InvalidInputError(
            f"task {name} also trained shared experts or non-expert modules, which every request shares: "
            "it cannot join mixed batches; serve its merged checkpoint as a separate model instead"
        )
    header.check_fits(model)
    if sha256 is None:
        header.check_values()
    if (profile := RoutingProfile.load(directory)) is not None:
        profile.check_fits(model.moe_layers, model.num_experts)
    nbytes = sum(path.stat().st_size for path in set(header.shards.values()))
    counts = {layer: len(experts) for layer, experts in header.selection.experts.items()}
    return Task(name, Path(directory), nbytes, counts, version, sha256, profile)


def check_base_fingerprint(base: str, task: Task) -> None:
    """Refuse a task trained from other weights than the served base's (its recorded fingerprint of the experts it
    replaced differs from theirs); reads only those base experts."""
    header = AdapterHeader.read(task.directory)
    expected = header.metadata.base_fingerprint
    if expected and (actual := checkpoint_fingerprint(base, header.selection)) not in (None, expected):
        raise InvalidInputError(
            f"task {task.name} was trained from other base weights than {base} "
            f"(fingerprint {actual[:12]} != {expected[:12]})"
        )
    task.base_checked = True


def without_path(message: str, directory: Path) -> str:
    """A message for HTTP clients: file names stay, the server's directories do not."""
    return message.replace(f"{directory}/", "").replace(str(directory), "the task's files")
