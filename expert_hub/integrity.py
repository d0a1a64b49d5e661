"""Hashing, durable copies and verified reads: how expert-hub knows that the bytes it stores, shares and loads are
the bytes it recorded. Every such loop lives here, with one chunk size, so each byte is read once and hashed the same
way by the registry (`registry/store.py`), the adapter loader and the serving worker.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import InvalidInputError
from .io import in_parallel

CHUNK = 8 * 2**20  # what is read or hashed at a time
SLICE = 64 * 2**20  # what the kernel copies at a time; each slice is hashed while the next is copied


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as reader:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_and_hash(source: Path, target: Path) -> dict:
    """Copy a file durably, reading it once, and return the sha256 and size of the copy.

    The kernel copies the bytes (`sendfile`: they never pass through Python) a slice at a time while a helper thread
    hashes the slices already copied from the copy itself, still in the page cache; the copy is flushed to disk once,
    while the hash finishes. Copying, hashing and flushing overlap, and the hash is of the stored bytes, not of what
    the source held when it was read.
    """
    digest, size = hashlib.sha256(), 0
    with source.open("rb") as reader, target.open("xb+") as writer, ThreadPoolExecutor(1) as hasher:
        hashed = []  # the slices, hashed in order by the one helper
        while copied := os.sendfile(writer.fileno(), reader.fileno(), size, SLICE):
            hashed.append(hasher.submit(_hash_range, digest, writer.fileno(), size, copied))
            size += copied
        os.fsync(writer.fileno())
        for slice_hashed in hashed:
            slice_hashed.result()
    return {"sha256": digest.hexdigest(), "size": size}


def _hash_range(digest, descriptor: int, offset: int, length: int) -> None:
    """Feed `length` bytes of a file from `offset` into `digest`, through one reused buffer."""
    buffer = memoryview(bytearray(min(length, CHUNK)))
    while length:
        read = os.preadv(descriptor, [buffer[: min(length, len(buffer))]], offset)
        if not read:
            raise OSError(f"the copy ended {length} bytes early while it was hashed")
        digest.update(buffer[:read])
        offset, length = offset + read, length - read


def write_durably(path: Path, data: bytes) -> None:
    """Write a new file and flush it to disk before returning."""
    with path.open("xb") as writer:
        writer.write(data)
        writer.flush()
        os.fsync(writer.fileno())


def read_verified(directory: Path, sha256: dict[str, str]) -> dict[str, torch.Tensor]:
    """Every recorded file's bytes, each checked against its hash (different files read and hashed at once)."""
    return dict(zip(sha256, in_parallel(lambda name: read_and_hash(directory / name, sha256[name]), list(sha256))))


def read_and_hash(path: Path, sha256: str) -> torch.Tensor:
    """A file's bytes, read once into memory while a helper thread hashes what has arrived; refused unless the hash
    is `sha256`. Chunks are hashed while still in the CPU cache, and reading overlaps hashing."""
    if not path.is_file():
        raise InvalidInputError(f"{path.name} is missing")
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as reader, ThreadPoolExecutor(1) as hasher:
        size = os.fstat(reader.fileno()).st_size
        buffer = torch.empty(size, dtype=torch.uint8)
        view, offset, hashed = buffer.numpy().data, 0, []
        while offset < size and (read := reader.readinto(view[offset : offset + CHUNK])):
            hashed.append(hasher.submit(digest.update, view[offset : offset + read]))
            offset += read
        for chunk in hashed:
            chunk.result()
    if offset != size or digest.hexdigest() != sha256:
        raise InvalidInputError(f"{path.name} does not match its recorded sha256 (changed or corrupted on disk)")
    return buffer
