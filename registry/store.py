"""The local registry: every task's expert adapters, versioned, verified, safe under crashes and concurrency.

Layout under the root (`$EXPERT_HUB_HOME`, default `$XDG_CACHE_HOME/expert-hub` or `~/.cache/expert-hub`):
- `objects/<sha256>/` — an adapter's files plus `manifest.json` (each file's sha256 and size). The directory name is
  the manifest's own sha256, so identical content is stored once and a name never points at other bytes.
- `index.json` — entries `(task, version, base model) -> object`, rewritten atomically under `index.lock`. A local
  base is known by its fingerprint (`bases.py`), with its path kept as a hint; a Hub id by its name.
- `bases.json` — the cache of local bases' fingerprints.
- `staging/` — imports in progress; a killed import leaves only a staging directory, removed by the next import.
Names never become paths: tasks are validated and objects are addressed by hash.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeGuard, overload

from expert_hub import integrity
from expert_hub.adapter import AdapterHeader, ExpertAdapter
from expert_hub.auto_routing import RoutingProfile
from expert_hub.errors import ExpertHubError, InvalidInputError
from expert_hub.io import (
    atomic_directory,
    fsync_path,
    in_parallel,
    publish_permissions,
    raise_with_filename,
    read_json,
    write_json_atomic,
)

from .bases import cached_fingerprint

MANIFEST_FILE = "manifest.json"
_TASK = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_DIGEST = re.compile(r"[0-9a-f]{64}")  # an object's name: the sha256 of its manifest
_SELECTOR = re.compile(r"[0-9]+|[0-9a-f]{4,64}")  # after `task@`: a version or a hash prefix
AUTO = "auto"  # the model name that asks the server to choose the task (`"model": "auto"`), so no task may have it


class RegistryError(ExpertHubError):
    """The registry holds no entry that matches a reference, or several, or cannot be written."""


class RegistryDamagedError(RegistryError):
    """The registry's own files (its index, a stored adapter) were changed or lost after they were written.

    Not invalid input: the caller asked for something that exists, and what is stored cannot be trusted.
    """


def validate_task_name(name: str) -> str:
    """Letters, digits and `-_.`, with an optional `namespace/`; never a path that climbs out, never `auto`.

    Every command that names a task (import, pull, train, profile, serve) passes here, so this is where `auto` is
    refused: a task of that name could never be asked for, and `serve --all-tasks` would refuse to start.
    """
    if not isinstance(name, str) or not _TASK.fullmatch(name) or ".." in name:
        raise InvalidInputError(
            f"invalid task name {name!r}: use letters, digits and '-_.', optionally 'namespace/name'"
        )
    if name == AUTO:
        raise InvalidInputError(
            f'the task name "{AUTO}" is reserved: "model": "{AUTO}" asks the server to choose a task'
        )
    return name


def default_root() -> Path:
    if home := os.environ.get("EXPERT_HUB_HOME"):
        return Path(home)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "expert-hub"


@overload
def normalize_base(base: str) -> str: ...
@overload
def normalize_base(base: None) -> None: ...
def normalize_base(base: str | None) -> str | None:
    """A local base as an absolute path, so `./base` and `/abs/base` read the same from anywhere; Hub ids as given."""
    if base is None:
        return None
    return str(Path(base).resolve()) if Path(base).exists() else base


@dataclass
class Entry:
    """One registered version of a task's experts."""

    task: str
    version: int
    base_model: str | None  # a Hub id, or a local base's absolute path when it was registered (a hint)
    digest: str
    created: str
    method: str | None = None
    experts: dict[str, int] = field(default_factory=dict)  # layer -> number of experts
    bytes: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    base_fingerprint: str | None = None  # a local base's `base_fingerprint`: what the registry knows it by

    @property
    def ref(self) -> str:
        return f"{self.task}@{self.version}"

    @property
    def base_key(self) -> tuple[str, str | None]:
        return _base_key(self.base_model, self.base_fingerprint)

    @property
    def base_description(self) -> str:
        return _describe_base(self.base_model, self.base_fingerprint)

    @classmethod
    def from_json(cls, data) -> Entry:
        """An index record, checked like any other input: its digest becomes a path that `rm` deletes."""
        if not isinstance(data, dict):
            raise RegistryDamagedError(f"is {type(data).__name__}, not an object")
        if missing := [name for name in ("task", "version", "base_model", "digest", "created") if name not in data]:
            raise RegistryDamagedError(f"lacks {', '.join(missing)}")
        for name, kinds in _ENTRY_FIELD_TYPES.items():
            if name in data and (isinstance(data[name], bool) or not isinstance(data[name], kinds)):
                raise RegistryDamagedError(f"has {name} = {data[name]!r:.80}")
        if not _DIGEST.fullmatch(data["digest"]):
            raise RegistryDamagedError(f"has digest {data['digest']!r}, which is not a sha256 in hex")
        if data["task"] == AUTO:  # registered before the name was reserved
            raise RegistryDamagedError(
                f'is task "{AUTO}", a name reserved for auto routing; to keep its experts, give them another name: '
                f"expert-hub import objects/{data['digest']} --task NAME (objects/ beside index.json)"
            )
        validate_task_name(data["task"])
        if data["version"] < 1 or data.get("bytes", 0) < 0:
            raise RegistryDamagedError("has a version below 1 or a negative size")
        if not all(isinstance(k, str) and type(v) is int for k, v in data.get("experts", {}).items()):
            raise RegistryDamagedError(f"has experts = {data['experts']!r:.80}")
        if not all(isinstance(k, str) and type(v) in (int, float) for k, v in data.get("metrics", {}).items()):
            raise RegistryDamagedError(f"has metrics = {data['metrics']!r:.80}")
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in data.items() if name in known})


_ENTRY_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "task": str,
    "version": int,
    "base_model": (str, type(None)),
    "digest": str,
    "created": str,
    "method": (str, type(None)),
    "experts": dict,
    "bytes": int,
    "metrics": dict,
    "base_fingerprint": (str, type(None)),
}


def _base_key(name: str | None, fingerprint: str | None) -> tuple[str, str | None]:
    """What a base is to the registry: a local base's fingerprint, else its name (a Hub id)."""
    return ("fingerprint", fingerprint) if fingerprint else ("name", name)


def _describe_base(name: str | None, fingerprint: str | None) -> str:
    return f"{name} (fingerprint {fingerprint[:12]})" if fingerprint else str(name)


class Registry:
    """A local store of expert adapters. Every method is safe to call from several processes at once."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def object_path(self, entry: Entry) -> Path:
        if not _DIGEST.fullmatch(entry.digest):  # entries come from `Entry.from_json`; this is the last guard
            raise RegistryDamagedError(f"{entry.ref}: digest {entry.digest!r} is not a sha256 in hex")
        return self.root / "objects" / entry.digest

    # --- reading -----------------------------------------------------------------------------------------------
    def entries(self, base: str | None = None) -> list[Entry]:
        """All entries (of one base model, if given), oldest first."""
        entries = self._read_index()[0]
        if base is None or not entries:
            return entries
        key = _base_key(*self._base(base, entries))
        return [entry for entry in entries if entry.base_key == key]

    def unreadable(self) -> list[str]:
        """Why each index record that cannot be used is skipped; they stay in the index untouched."""
        return [why for _, why in self._read_index()[1]]

    def resolve(self, ref: str, base: str | None = None) -> Entry:
        """`law` (newest), `law@3` (a version) or `law@1f3a9c` (a content-hash prefix, at least 4 characters).

        An all-digit selector means a version if one has that number, else a hash prefix.
        """
        task, at, selector = ref.partition("@")
        validate_task_name(task)
        if at and not _SELECTOR.fullmatch(selector):
            raise InvalidInputError(f"{ref!r}: after '@' give a version number or at least 4 hex digits of a hash")
        candidates = [entry for entry in self.entries(base) if entry.task == task]
        if selector:
            by_version = [e for e in candidates if selector.isdigit() and e.version == int(selector)]
            # an all-digit selector is a version when one matches, else (4+ digits) a hash prefix
            candidates = by_version or [e for e in candidates if len(selector) >= 4 and e.digest.startswith(selector)]
        if not candidates:
            where = f" for base {_describe_base(*self._base(base, self.entries()))}" if base else ""
            others = sorted({e.base_description for e in self.entries() if e.task == task}) if base else []
            if others:  # pulled for a Hub id, used with a local copy (or the other way round): say how to re-point
                raise RegistryError(
                    f"no registered task {ref!r}{where}; it is registered for {', '.join(others)}. To use it with "
                    f"this base: expert-hub export {ref} DIR && expert-hub import DIR --base {base}"
                )
            raise RegistryError(f"no registered task {ref!r}{where} (see `expert-hub list`)")
        if len({entry.base_key for entry in candidates}) > 1:
            bases = sorted({entry.base_description for entry in candidates})
            raise RegistryError(f"{ref!r} exists for several base models ({', '.join(bases)}); name the base")
        return max(candidates, key=lambda entry: entry.version)

    def _base(self, base: str | None, entries: list[Entry]) -> tuple[str | None, str | None]:
        """`base` as entries record it: (name, fingerprint).

        A local directory is named by its absolute path and known by its fingerprint. Any other name is a Hub id,
        or the path of a local base registered before it moved: that one is known by the fingerprint recorded with
        it, so `--base` with a path `expert-hub list` shows still works.
        """
        name = normalize_base(base)
        if name is not None and Path(name).is_dir():
            return name, cached_fingerprint(Path(name), self.root)
        recorded = [entry.base_fingerprint for entry in entries if entry.base_model == name and entry.base_fingerprint]
        return name, recorded[-1] if recorded else None

    def verify(self, entry: Entry) -> Path:
        """Check every stored file against the manifest; a damaged entry is named and never used."""
        path = self.object_path(entry)
        try:
            _check_object(path, entry.digest)
        except RegistryDamagedError as error:
            raise RegistryDamagedError(f"{entry.ref}: {error}") from error
        return path

    def file_hashes(self, entry: Entry) -> dict[str, str]:
        """Each stored file's recorded sha256, from a manifest checked against the entry; no file is read.

        For a reader that hashes the bytes it reads itself (the server, loading a task into its bank), instead of a
        `verify` pass before reading them again.
        """
        path = self.object_path(entry)
        try:
            files = _checked_manifest(path, entry.digest)
        except RegistryDamagedError as error:
            raise RegistryDamagedError(f"{entry.ref}: {error}") from error
        return {name: record["sha256"] for name, record in files.items()}

    def load(self, ref: str, base: str | None = None) -> ExpertAdapter:
        """The verified adapter of a registry reference.

        Verified first, then memory-mapped from the page cache the check just filled, so the tensors cost neither a
        second read nor fresh memory. That beats reading each file into fresh memory once and hashing it as it
        arrives (what the server's worker does, since the bytes it writes into its bank must be the bytes it hashed),
        and reading the tensors while the check runs (a cold disk then serves two readers at once); the figure is in
        benchmarks/results/registry.md, History.
        """
        return ExpertAdapter.load(self.verify(self.resolve(ref, base)))

    # --- writing -----------------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Refuse now, before hours of training, when nothing could be registered at the end."""
        existing = next(path for path in (self.root, *self.root.parents) if path.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise RegistryError(
                f"cannot write the registry at {self.root} ({existing} is not a writable directory); "
                "set EXPERT_HUB_HOME to another directory or pass --no-register"
            )

    def register(self, directory: str | Path, task: str | None = None, base: str | None = None) -> Entry:
        """Copy an adapter directory in as the next version of its task; returns the new entry, or the task's newest
        version when that holds these very bytes (a rerun adds no version).

        Each source byte is read once: hashed while it is written (the files at once), then the copy, not the
        source, is checked, so a file changed during the import cannot slip in unchecked. The copy becomes visible
        by one rename; only then is the index updated, under the lock. A process killed at any point leaves the
        registry as it was.
        """
        directory = Path(directory)
        refuse_links_and_special_files(directory)
        task = validate_task_name(task) if task is not None else None  # before gigabytes are copied
        sources = _adapter_files(directory)
        staging_root = self.root / "staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        self._remove_abandoned_staging()
        staging = Path(tempfile.mkdtemp(dir=staging_root, prefix=f"{os.getpid()}-"))
        try:
            records = in_parallel(lambda source: integrity.copy_and_hash(source, staging / source.name), sources)
            files = {source.name: record for source, record in zip(sources, records)}
            adapter = _check_adapter(staging, named_as=directory)
            task = task or validate_task_name(adapter.metadata.task or "")
            base_model, fingerprint = self._base(base or adapter.metadata.base_model, self._read_index()[0])
            manifest = _manifest(files)
            integrity.write_durably(staging / MANIFEST_FILE, manifest)
            publish_permissions(staging)
            fsync_path(staging)  # the files were flushed as they were copied; this makes their names durable
            digest = integrity.sha256_bytes(manifest)
            with self._locked_index() as entries:  # placing the object under the lock keeps `remove` out of the way
                self._place_object(staging, digest)
                key = _base_key(base_model, fingerprint)
                versions = [e for e in entries if e.task == task and e.base_key == key]
                newest = max(versions, key=lambda e: e.version, default=None)
                if newest is not None and newest.digest == digest:
                    return newest
                entry = Entry(
                    task=task,
                    version=1 + (newest.version if newest else 0),
                    base_model=base_model,
                    base_fingerprint=fingerprint,
                    digest=digest,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    method=adapter.metadata.method,
                    experts={str(layer): len(ids) for layer, ids in sorted(adapter.selection.experts.items())},
                    bytes=sum(f["size"] for f in files.values()),
                    metrics=dict(adapter.metadata.metrics),
                )
                entries.append(entry)
        except OSError as error:
            raise_with_filename(error, self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return entry

    def remove(self, ref: str, base: str | None = None) -> list[Entry]:
        """Remove one version (`law@2`) or every version of a task (`law`); returns what was removed."""
        target = self.resolve(ref, base)
        removed = []
        with self._locked_index() as entries:
            for entry in list(entries):
                same_task = entry.task == target.task and entry.base_key == target.base_key
                if same_task and ("@" not in ref or entry.version == target.version):
                    entries.remove(entry)
                    removed.append(entry)
            still_used = {entry.digest for entry in entries}
            for entry in removed:
                if entry.digest not in still_used:
                    _remove_tree(self.object_path(entry))
        return removed

    def export(self, ref: str, destination: str | Path, base: str | None = None) -> Path:
        """Write a verified copy of an entry's adapter files (without the manifest) to `destination`."""
        source = self.verify(self.resolve(ref, base))
        with atomic_directory(destination) as staging:
            for file in source.iterdir():
                if file.name != MANIFEST_FILE:
                    shutil.copyfile(file, staging / file.name)
        return Path(destination)

    def _place_object(self, staging: Path, digest: str) -> None:
        """Make `staging` the object `digest`, unless that content is already stored intact."""
        target = self.root / "objects" / digest
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            try:
                _check_object(target, digest)
                return
            except RegistryDamagedError:  # a damaged copy of the same content: the fresh one takes its place
                _remove_tree(target)
        os.replace(staging, target)

    @contextmanager
    def _locked_index(self) -> Iterator[list[Entry]]:
        """The entries, to change in place; written back atomically when the block ends, all under the lock."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "index.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries, unreadable = self._read_index()
                yield entries
                records = [asdict(entry) for entry in entries] + [record for record, _ in unreadable]
                write_json_atomic(self.index_path, {"entries": records})
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_index(self) -> tuple[list[Entry], list[tuple[object, str]]]:
        """The usable entries, and each unusable record with why; a file that is no index at all is refused."""
        if not self.index_path.is_file():
            return [], []
        try:
            data = read_json(self.index_path)
        except InvalidInputError as error:  # not JSON: written by something else, or cut short by a disk error
            raise RegistryDamagedError(f"{error}; move it aside and re-import the adapters") from error
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise RegistryDamagedError(
                f"{self.index_path} is not a registry index (an object with a list of entries); "
                "move it aside and re-import the adapters"
            )
        entries, unreadable, fingerprints = [], [], {}
        for position, record in enumerate(data["entries"], 1):
            try:
                entry = Entry.from_json(record)
            except (RegistryDamagedError, InvalidInputError) as error:  # a task name that is not one: damaged too
                unreadable.append((record, f"{self.index_path} entry {position} {error}"))
                continue
            if entry.base_fingerprint is None and _is_local_base(entry.base_model):
                # registered when local bases were known by their path: known from now on by what is there (the
                # next write of the index keeps it), so the base may move
                if entry.base_model not in fingerprints:
                    fingerprints[entry.base_model] = cached_fingerprint(Path(entry.base_model), self.root)
                entry.base_fingerprint = fingerprints[entry.base_model]
            entries.append(entry)
        return entries, unreadable

    def _remove_abandoned_staging(self) -> None:
        """Staging directories of processes that no longer run (killed mid-import)."""
        for path in (self.root / "staging").iterdir():
            pid = path.name.split("-", 1)[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _is_local_base(base_model: str | None) -> TypeGuard[str]:
    """An absolute path to a directory: what a local base was registered as (a Hub id is never absolute)."""
    return base_model is not None and Path(base_model).is_absolute() and Path(base_model).is_dir()


def refuse_links_and_special_files(directory: Path) -> None:
    """A link would copy (and `push` publish) whatever it points at, such as a key file elsewhere on the disk."""
    if not directory.is_dir():
        raise InvalidInputError(f"{directory} is not a directory")
    for path in sorted(directory.iterdir()):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            kind = "a symlink" if path.is_symlink() else "not a regular file"
            raise InvalidInputError(f"{path} is {kind}; an adapter directory holds regular files only")


def _check_adapter(staging: Path, named_as: Path) -> AdapterHeader:
    """Refuse a staged copy that is not a complete adapter of finite floating-point weights, with a routing profile
    (when it has one) that is a distribution over experts.

    The copy is what gets stored, so it is what is checked (from the page cache it was just written to); errors name
    the source directory, which is what the user gave. Whether the profile fits a base is checked where a base is
    loaded (`serve`, `route`).
    """
    try:
        adapter = AdapterHeader.read(staging)
        adapter.check_values()
        RoutingProfile.load(staging)
    except InvalidInputError as error:
        raise InvalidInputError(str(error).replace(str(staging), str(named_as))) from error
    return adapter


def content_digest(directory: str | Path) -> str:
    """The digest `Registry.register` gives `directory`'s adapter files (the object's name), without copying them:
    what names an adapter that is not registered."""
    files = {
        path.name: {"sha256": integrity.sha256_file(path), "size": path.stat().st_size}
        for path in _adapter_files(directory)
    }
    return integrity.sha256_bytes(_manifest(files))


def _adapter_files(directory: str | Path) -> list[Path]:
    return sorted(
        path
        for path in Path(directory).iterdir()
        if path.is_file() and not path.name.startswith(".") and path.name != MANIFEST_FILE
    )


def _manifest(files: dict[str, dict]) -> bytes:
    return json.dumps({"files": files}, sort_keys=True, indent=1).encode()


def _check_object(path: Path, digest: str) -> None:
    """Every stored file against the manifest, the files hashed at once (one pass over the bytes)."""
    files = _checked_manifest(path, digest)
    in_parallel(lambda name: _check_file(path / name, files[name]), sorted(files))


def _checked_manifest(path: Path, digest: str) -> dict[str, dict]:
    """The manifest's file records, once the manifest matches `digest` and the stored files are the ones it lists."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise RegistryDamagedError(f"stored files are missing ({path})")
    manifest = manifest_path.read_bytes()
    if integrity.sha256_bytes(manifest) != digest:
        raise RegistryDamagedError(f"{manifest_path} was modified")
    files = json.loads(manifest)["files"]  # the bytes just hashed, not a second read
    present = {p.name for p in path.iterdir() if p.name != MANIFEST_FILE}
    if extra := sorted(present - set(files)):
        raise RegistryDamagedError(f"unexpected file {path / extra[0]}")
    if missing := sorted(set(files) - present):
        raise RegistryDamagedError(f"missing file {path / missing[0]}")
    return files


def _check_file(file: Path, expected: dict) -> None:
    if not file.is_file():
        raise RegistryDamagedError(f"missing file {file}")
    if file.stat().st_size != expected["size"] or integrity.sha256_file(file) != expected["sha256"]:
        raise RegistryDamagedError(f"file {file} does not match its recorded sha256 (corrupted?)")


def _remove_tree(path: Path) -> None:
    """Rename first, so no reader ever sees a half-deleted object."""
    if path.exists():
        retired = path.with_name(f".removed-{path.name}-{os.getpid()}")
        os.replace(path, retired)
        shutil.rmtree(retired, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
