"""How the registry knows a local base model: by what it is, not where it lies.

A local base is known by `base_fingerprint` (its config and weights), so the same base at another path (the
repository cloned elsewhere, the package installed in another environment, a moved model directory) keeps its tasks.
Fingerprinting reads every weight, so each result is cached in `bases.json` under the registry root, keyed by the
base's path and the size and modification time of every file the fingerprint reads: a changed file is read again.
The cache is only a cache: when it cannot be read it is rebuilt, and when it cannot be written (a read-only
registry) the fingerprint is computed again next time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from expert_hub.adapter import base_fingerprint
from expert_hub.errors import InvalidInputError
from expert_hub.io import read_json, write_json_atomic

CACHE_FILE = "bases.json"


def cached_fingerprint(base: Path, root: Path) -> str | None:
    """`base_fingerprint(base)` for an absolute directory, computed once per version of its files."""
    stamp = _stamp(base)  # taken first: a file changed while it is read leaves a record that no longer matches
    record = _read(root / CACHE_FILE).get(str(base))
    if isinstance(record, dict) and record.get("files") == stamp and isinstance(record.get("fingerprint"), str):
        return record["fingerprint"]
    fingerprint = base_fingerprint(base)
    if fingerprint is not None and root.is_dir():  # a read never creates the registry
        with contextlib.suppress(OSError, InvalidInputError):
            records = _read(root / CACHE_FILE) | {str(base): {"files": stamp, "fingerprint": fingerprint}}
            write_json_atomic(root / CACHE_FILE, records)
    return fingerprint


def _stamp(base: Path) -> dict[str, list[int]]:
    """Each file the fingerprint reads, by name: its size and modification time in nanoseconds."""
    stamp = {}
    for file in [base / "config.json", *sorted(base.glob("*.safetensors"))]:
        with contextlib.suppress(FileNotFoundError):
            status = file.stat()
            stamp[file.name] = [status.st_size, status.st_mtime_ns]
    return stamp


def _read(cache: Path) -> dict:
    try:
        records = read_json(cache) if cache.is_file() else {}
    except InvalidInputError:  # cut short or edited by hand: rebuilt
        return {}
    return records if isinstance(records, dict) else {}
