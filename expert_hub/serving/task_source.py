"""Where tasks that are not servable yet come from: the registry's tasks of the served base (`POST /v1/tasks`),
and, with `--allow-pull`, Hub repos a request names, pulled into the registry first (as LoRAX pulls LoRA adapters).

Synchronous (file and network I/O): the task manager runs these in threads.
"""

from __future__ import annotations

import fnmatch
import logging

from expert_hub.errors import ExpertHubError, InvalidInputError
from expert_hub.models import ModelSummary
from expert_hub.registry import RegistryDamagedError, RegistryError

from .served_tasks import Task, TaskError, adapter_task, without_path

logger = logging.getLogger(__name__)


class TaskSource:
    def __init__(self, registry, base: str | None, model: ModelSummary, allow_pull: tuple[str, ...] = ()):
        self.registry, self.base, self.model = registry, base, model
        self.allow_pull = allow_pull  # `ORG/*` patterns of Hub repos a request may name to have them pulled

    def pullable(self, name: str) -> bool:
        """A Hub repo (`ORG/NAME`, no version) that `--allow-pull` lets requests name."""
        return "/" in name and "@" not in name and any(fnmatch.fnmatchcase(name, p) for p in self.allow_pull)

    def registered(self, ref: str) -> Task:
        """The registered task `ref` (`law`, `law@3`, `law@1f3a`) of the served base, from its manifest and headers."""
        if self.registry is None:
            raise TaskError(f"task {ref} is not servable: the server has no registry", 404)
        try:
            entry = self.registry.resolve(ref, self.base)
        except RegistryDamagedError as error:  # the server's own files: logged here, not shown to clients
            logger.error("cannot look up task %s: %s", ref, error)
            raise TaskError(f"cannot look up task {ref!r}: the server's registry is damaged", 500) from error
        except RegistryError as error:
            raise TaskError(f"no task {ref!r} is registered for the served model", 404) from error
        except InvalidInputError as error:  # a malformed name or version
            raise TaskError(str(error), 400) from error
        directory = self.registry.object_path(entry)
        try:
            hashes = self.registry.file_hashes(entry)
            return adapter_task(entry.task, directory, self.model, entry.version, hashes)
        except ExpertHubError as error:
            raise TaskError(f"cannot serve {entry.ref}: {without_path(str(error), directory)}", 422) from error

    def pulled(self, name: str) -> Task:
        """The registered task `name`, pulled from the Hub first when it is not registered for the served base."""
        from expert_hub.registry.hub import HubError, HubNotFoundError, pull

        try:
            return self.registered(name)
        except TaskError as error:
            if error.status != 404:
                raise
        try:
            entry = pull(self.registry, name, task=name, base=self.base)
        except HubNotFoundError as error:
            raise TaskError(f"no task {name!r}: {error}", 404) from error
        except HubError as error:
            raise TaskError(f"cannot pull {name} from the Hub now: {error}", 502) from error
        except ExpertHubError as error:  # not an expert adapter, or not one this registry can hold
            raise TaskError(f"cannot serve {name} from the Hub: {error}", 422) from error
        logger.info("pulled %s from the Hub as %s", name, entry.ref)
        return self.registered(entry.ref)
