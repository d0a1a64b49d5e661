"""Small file helpers shared by every writer: atomic writes and JSON reads with clear errors."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

from .errors import InvalidInputError

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so readers see the old file or the new one, never half of one."""

    def write(handle: IO) -> None:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")

    write_atomic(path, write)


def write_atomic(path: str | Path, write: Callable[[IO], object], binary: bool = False) -> None:
    """Have `write` fill a temporary file beside `path`, then rename it into place: readers see the old file or
    the new one, never half of one."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{path} is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "wb" if binary else "w"
        handle = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", delete=False)  # noqa: SIM115 (closed below; removed on failure)
    except OSError as error:
        raise InvalidInputError(f"cannot write {path}: {error.strerror}") from error
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o666 & ~_umask())  # mkstemp makes files private; match a plain open()
        os.replace(handle.name, path)
    except BaseException as error:
        Path(handle.name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise_with_filename(error, path)
        raise


def raise_with_filename(error: OSError, path: str | Path) -> NoReturn:
    """Raise `error`, naming `path` when it names no file: a full disk fails write() and fsync(), which don't."""
    if error.filename is not None:
        raise error
    raise type(error)(error.errno, error.strerror or str(error), str(path)) from error


def publish_permissions(directory: Path) -> None:
    """Give a staged tree the modes a plain mkdir/open would (mkdtemp and some writers make them private)."""
    mask = _umask()
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_tree(directory: Path) -> None:
    """Flush a staged directory's files and the directory itself to disk before it is renamed into place."""
    for path in [*Path(directory).rglob("*"), Path(directory)]:
        fsync_path(path)


def fsync_path(path: str | Path) -> None:
    """Flush one file or directory to disk (a directory: its entries, so new names survive a crash)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_directory(staging: Path, directory: Path) -> None:
    """Move `staging` to `directory`, swapping out any old one so no reader sees a mix of both."""
    if directory.exists():
        retired = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
        os.replace(directory, retired / directory.name)
        os.replace(staging, directory)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, directory)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


MAX_LINE_BYTES = 64 * 2**20  # one JSONL record; parsing a longer one would take several GB of memory


def numbered_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines of a text file with their 1-based numbers; a line that is not UTF-8 is reported.

    A UTF-8 byte-order mark (what some Windows editors write) is dropped. A line is read at most `MAX_LINE_BYTES`
    at a time, so one enormous record is refused instead of exhausting memory.
    """
    for number, _, line in numbered_lines_with_offsets(path):
        yield number, line


def numbered_lines_with_offsets(path: str | Path) -> Iterator[tuple[int, int, str]]:
    """`numbered_lines` with each line's byte offset, so a line can be read again later without holding it."""
    with Path(path).open("rb") as lines:
        number, offset = 0, 0
        while raw := lines.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise InvalidInputError(
                    f"{path}:{number}: longer than {MAX_LINE_BYTES // 2**20} MiB; "
                    "one record per line, each under that size"
                )
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise InvalidInputError(f"{path}:{number}: not UTF-8 text") from error
            if line.strip():
                yield number, offset, line
            offset += len(raw)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"{path} is not valid JSON: {error}") from error
    except RecursionError as error:
        raise InvalidInputError(f"{path} is nested too deeply to be expert-hub JSON") from error


@contextmanager
def atomic_directory(directory: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that replaces `directory` in one rename when the block succeeds.

    Readers see the old directory or the complete new one, never a mix; on an error nothing changes.
    """
    directory = writable_directory(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        yield staging
        _publish(staging, directory)
    except OSError as error:
        raise_with_filename(error, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def resumable_directory(directory: str | Path, plan: str, overwrite: bool = False) -> Iterator[Path]:
    """`atomic_directory` for work that takes long: a failed or killed run leaves its staging directory
    (`.NAME.partial`), and the next run with the same `plan` (a text naming the inputs) is handed what it finished;
    another plan starts afresh. Writers must put each file in place whole, written under a hidden name beside it
    and then renamed: a visible file there is complete, and hidden ones (a killed writer's) are removed. A lock keeps
    a second writer out while one runs.
    """
    directory = writable_directory(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging, marker = directory.parent / f".{directory.name}.partial", directory.parent / f".{directory.name}.plan"
    lock_path = directory.parent / f".{directory.name}.lock"
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not lock_path.exists() or os.stat(lock_path).st_ino != os.fstat(lock.fileno()).st_ino:
                raise BlockingIOError  # the writer that held it has just finished and removed it
        except BlockingIOError:
            raise InvalidInputError(f"another process is writing {directory}; wait for it to finish") from None
        writable_directory(directory, overwrite)  # again, under the lock: another writer may have just finished
        try:
            if staging.exists() and not (marker.is_file() and marker.read_text(encoding="utf-8") == plan):
                shutil.rmtree(staging)
            staging.mkdir(exist_ok=True)
            for leftover in staging.glob(".*"):
                leftover.unlink()
            write_atomic(marker, lambda handle: handle.write(plan))
            yield staging
            _publish(staging, directory)
            marker.unlink()
            lock_path.unlink()
        except OSError as error:
            raise InvalidInputError(
                f"cannot write {directory}: {error.strerror or error} ({getattr(error, 'filename', None) or ''}); "
                f"what is done stays in {staging} for a rerun"
            ) from error


def writable_directory(directory: str | Path, overwrite: bool = False) -> Path:
    """`directory` as an absolute path, once it is known that a new one may be written there: checked before long
    work, not after it (nothing is created)."""
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise InvalidInputError(f"{directory} is a file; give a directory path")
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise InvalidInputError(f"{directory} already exists and is not empty; remove it or choose another path")
    if os.path.ismount(directory) or directory == Path.cwd():
        raise InvalidInputError(
            f"{directory} cannot be replaced (a mount point or the working directory); give a path inside it"
        )
    return directory


def _publish(staging: Path, directory: Path) -> None:
    publish_permissions(staging)
    fsync_tree(staging)
    replace_directory(staging, directory)


def in_parallel(function: Callable[[_Item], _Result], items: list[_Item]) -> list[_Result]:
    """`function` over `items`, one thread per core at most: hashing different files at once uses every core."""
    with ThreadPoolExecutor(max(1, min(len(items), os.cpu_count() or 1))) as pool:
        return list(pool.map(function, items))
