"""Sharing registry entries on the Hugging Face Hub: `push` a task's experts, `pull` a repo into the registry.

All traffic goes through `huggingface_hub` (`HfApi.create_repo` / `upload_folder`, `snapshot_download`), which
takes credentials from `HF_TOKEN` or `hf auth login` and honours `HF_ENDPOINT` and `HF_HUB_OFFLINE`. Failures
become one-line `HubError`s; the local registry changes only after a pull has fully downloaded.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from httpx2 import HTTPError as TransportError  # huggingface_hub's HTTP client: network failures
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from expert_hub.adapter import METADATA_FILE, AdapterHeader
from expert_hub.errors import ExpertHubError
from expert_hub.io import first_line, write_json_atomic

from .card import model_card, public_metadata
from .store import MANIFEST_FILE, Entry, Registry, validate_task_name


class HubError(ExpertHubError):
    """The Hub refused or could not be reached; nothing local was changed."""


class HubNotFoundError(HubError):
    """The repository or revision does not exist (or the token cannot see it)."""


def push(
    registry: Registry,
    ref: str,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    base: str | None = None,
    license: str = "other",
    token: str | None = None,
    base_model: str | None = None,
) -> str:
    """Upload a verified registry entry, with a generated model card, to `repo_id`; returns the commit URL.

    `base_model` is the Hub id of the base the experts were trained from, for an entry trained on a local copy:
    the card and `expert_hub.json` name it, and no local path is published.
    """
    entry = registry.resolve(ref, base)
    source = registry.verify(entry)
    header = AdapterHeader.read(source)
    metadata = public_metadata(header.metadata, base_model)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging, _hub_errors(repo_id, revision):
        for file in source.iterdir():
            if file.name not in (MANIFEST_FILE, "README.md", METADATA_FILE):
                shutil.copyfile(file, Path(staging) / file.name)
        write_json_atomic(Path(staging) / METADATA_FILE, asdict(metadata))
        model_card(repo_id, entry.task, header.selection, metadata, license).save(Path(staging) / "README.md")
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            revision=revision,
            commit_message=commit_message or f"Upload {entry.ref} experts ({entry.digest[:12]})",
        )
    return commit.commit_url


def pull(
    registry: Registry,
    repo_id: str,
    revision: str | None = None,
    task: str | None = None,
    base: str | None = None,
    token: str | None = None,
    prepare: Callable[[Path], None] | None = None,
) -> Entry:
    """Download `repo_id` (expert-hub's layout or a published `deepseek-ai/ESFT-*-lite` one) and register it.

    The task name defaults to the adapter's own, else the repo's name. `prepare` may add files to the downloaded
    directory before it is registered (the CLI's `--profile-data` adds a routing profile), so one version holds all.
    """
    if task is not None:
        validate_task_name(task)  # before anything is downloaded
    with tempfile.TemporaryDirectory() as download:
        with _hub_errors(repo_id, revision):  # plain files of our own: the Hub cache's snapshot is symlinks
            directory = Path(snapshot_download(repo_id, revision=revision, token=token, local_dir=download))
        header = AdapterHeader.read(directory)
        task = validate_task_name(task or header.metadata.task or repo_id.split("/")[-1])
        if prepare is not None:
            prepare(directory)
        return registry.register(directory, task=task, base=base)


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """A model repository's safetensors weights, configs and tokenizer, through huggingface_hub's cache (a second
    call downloads nothing): what `expert-hub merge` rewrites when the base is a Hub id."""
    with _hub_errors(repo_id, revision):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_MODEL_FILES))


_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # never pickled weights or code


@contextmanager
def _hub_errors(repo_id: str, revision: str | None):
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        yield
    except HFValidationError as error:
        raise HubError(f"invalid repository id {repo_id!r}: use ORG/NAME (letters, digits, '-', '_', '.')") from error
    except LocalTokenNotFoundError as error:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`") from error
    except RevisionNotFoundError as error:
        raise HubNotFoundError(f"revision {revision!r} not found in {repo_id}") from error
    except RepositoryNotFoundError as error:
        raise HubNotFoundError(f"repository {repo_id} not found, or your token cannot access it") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        hint = "; check HF_TOKEN or `hf auth login`" if status in (401, 403) else ""
        detail = (getattr(error, "server_message", None) or first_line(error)).strip().splitlines()[0]
        raise HubError(f"the Hub refused {where} (HTTP {status}): {detail}{hint}") from error
    except OfflineModeIsEnabled as error:
        raise HubError(f"cannot reach the Hub for {where}: HF_HUB_OFFLINE is set") from error
    except LocalEntryNotFoundError as error:
        raise HubError(f"cannot download {where}: {first_line(error)}") from error
    except (TransportError, ConnectionError) as error:  # network down, DNS, refused connection
        raise HubError(f"cannot reach the Hub for {where}: {first_line(error)}") from error
    except ValueError as error:  # huggingface_hub's refusals, such as a file name that climbs out of the download
        raise HubError(f"cannot download {where}: {first_line(error)}") from error
