"""`expert-hub` entry point: registers every command module and turns expected errors into one line."""

from __future__ import annotations

import sys

import typer

from expert_hub.errors import ExpertHubError
from expert_hub.io import first_line

from . import (  # noqa: F401  (importing registers their commands)
    analysis,
    analyze,
    builtin_tasks,
    evaluation,
    merge,
    quickstart,
    registry_commands,
    routing_commands,
    serving,
    training,
)
from .app import app


def main() -> None:
    """Expected errors become one line on stderr and a non-zero exit, never a traceback."""
    from huggingface_hub.utils import logging as huggingface_hub_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    huggingface_hub_logging.set_verbosity_error()
    command = typer.main.get_command(app)
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
    except ExpertHubError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:  # disk full, permission denied, ...: say which file, not where in the code
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as error:  # torch and vLLM report out-of-memory, device and kernel failures this way
        print(f"error: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
        sys.exit(1)
