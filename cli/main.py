"""`expert-hub` entry point: registers every command module and turns expected errors into one line."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import typer

from expert_hub.errors import ExpertHubError, InternalError
from expert_hub.io import first_line, write_atomic

from . import (  # noqa: F401  (importing registers their commands)
    analyze,
    auto_routing_commands,
    builtin_tasks,
    evaluation,
    merge,
    quickstart,
    registry_commands,
    scoring_commands,
    serving,
    training,
)
from .app import RunOptions, app


def main() -> None:
    """Expected errors become one line on stderr and a non-zero exit, never a traceback; a bug says so, and its
    traceback goes to a file to report. `--debug` (or EXPERT_HUB_DEBUG=1) lets every error through as it is."""
    from huggingface_hub.utils import logging as huggingface_hub_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    huggingface_hub_logging.set_verbosity_error()
    command = typer.main.get_command(app)
    RunOptions.debug = False
    try:
        command.main(standalone_mode=False)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as error:  # usage errors: unknown option, bad value, missing argument
        message = error.format_message()
        if "\n" in message.strip():  # no arguments at all: the message is the help text
            print(message, file=sys.stderr)
        else:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(error.exit_code)
    except Exception as error:
        if RunOptions.debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(1)


def _one_line(error: Exception) -> str:
    if isinstance(error, ExpertHubError):
        return str(error)
    if isinstance(error, OSError):  # disk full, permission denied, ...: say which file, not where in the code
        return str(error)
    if isinstance(error, RuntimeError) and not isinstance(error, InternalError):
        # torch and vLLM report out-of-memory, device and kernel failures this way
        return f"{type(error).__name__}: {first_line(error)}"
    return f"{type(error).__name__}: {first_line(error)}; this is a bug in expert-hub: please report it with {_save_report(error)}"


def _save_report(error: Exception) -> str:
    """The traceback, the command and the versions in a file under the expert-hub home; where it went, to quote."""
    from datetime import datetime, timezone
    from importlib.metadata import PackageNotFoundError, version

    from expert_hub.registry.store import default_root

    lines = [f"expert-hub {' '.join(sys.argv[1:])}"]
    for package in ("expert-hub", "torch", "transformers", "vllm"):
        with contextlib.suppress(PackageNotFoundError):
            lines.append(f"{package} {version(package)}")
    report = "\n".join(lines) + "\n\n" + "".join(traceback.format_exception(error))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = default_root() / "bug-reports" / f"{stamp}-{os.getpid()}.txt"
    try:
        write_atomic(path, lambda handle: handle.write(report))
    except (OSError, ExpertHubError):  # nowhere to write it: the traceback goes to stderr instead
        print(report, file=sys.stderr)
        return "the traceback above"
    return str(path)
