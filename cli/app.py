"""The Typer app, the console and the small helpers every command shares."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from expert_hub.errors import InvalidInputError
from expert_hub.scores import SCORE_FUNCTIONS
from expert_hub.settings import DTYPES

app = typer.Typer(
    name="expert-hub",
    help="Expert-Specialized Fine-Tuning (ESFT) for Mixture-of-Experts models: score, select, train and share "
    "the routed experts a task uses.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,  # help texts show "[default: ...]" as written
    pretty_exceptions_enable=False,
)


def _console(stderr: bool = False) -> Console:
    """Markup off, since paths and task names are printed; whole lines when writing to a pipe or a file.

    Rich assumes 80 columns off a terminal, which cuts table columns and splits URLs over lines for
    `expert-hub list | cat` or `url=$(expert-hub push ...)`; COLUMNS, when set, still wins.
    """
    piped = not (sys.stderr if stderr else sys.stdout).isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, markup=False, width=2**16 if piped else None, soft_wrap=piped)


console = _console()  # results
status_console = _console(stderr=True)  # progress and status, so `--json` output stays clean


def _print_version(wanted: bool) -> None:
    if wanted:
        from importlib.metadata import version

        console.print(f"expert-hub {version('expert-hub')}")
        raise typer.Exit()


class RunOptions:
    """What `expert-hub`'s own options asked of this run; `main` resets them before each."""

    debug = False


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", envvar="EXPERT_HUB_DEBUG", help="Let errors through with their full traceback."
    ),
) -> None:
    """Options of `expert-hub` itself (the app's help is `Typer(help=...)` above)."""
    RunOptions.debug = debug


# Choices made from the engine's own lists (mypy sees no members, hence the defaults made by value below)
ScoreFunction = Enum("ScoreFunction", {name: name for name in SCORE_FUNCTIONS}, type=str)  # type: ignore[misc]


DType = Enum("DType", {name: name for name in DTYPES}, type=str)  # type: ignore[misc]
TOKEN_SCORES, AUTO_DTYPE = ScoreFunction("token"), DType("auto")

# Options several commands take, declared once (the commands whose options are a config's fields use the help).
DEVICE_HELP = "torch device (default: cuda when available)."
TRUST_REMOTE_CODE_HELP = "Run the model repo's own code (only if you trust it)."
JSON_HELP = "Print JSON instead of a table."
Device = Annotated[str | None, typer.Option(help=DEVICE_HELP)]
TrustRemoteCode = Annotated[bool, typer.Option(help=TRUST_REMOTE_CODE_HELP)]
AsJson = Annotated[bool, typer.Option("--json", help=JSON_HELP)]


def check_output_file(path: Path) -> None:
    """Fail before long work, not after it, when the output cannot be written."""
    if path.is_dir():
        raise InvalidInputError(f"{path} is a directory; give a file path for the output")
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise InvalidInputError(f"cannot write {path}: {existing} is not a writable directory")


def progress_bar(unit: str) -> Progress:
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeRemainingColumn(),
        console=status_console,
    )


def base_or_demo(base: str | None) -> str:
    """`--base`, or the demo base shipped in the package when it is omitted."""
    if base is not None:
        return base
    from expert_hub.demo import demo_base

    if not Path(demo_base(), "model.safetensors").is_file():
        raise InvalidInputError(
            f"the demo base is missing from {demo_base()} (re-make it with `make demo-base`); or give --base MODEL"
        )
    return demo_base()


def builtin_data(task: str, split: str) -> str:
    """The built-in task's `split` as a JSONL file under the expert-hub home (written afresh: same bytes each time)."""
    from expert_hub.registry.store import default_root
    from expert_hub.tasks import export

    return str(export(task, default_root() / "tasks" / task)[split])


def data_or_builtin(data: str | None, task: str | None, split: str) -> str:
    """`--data`, or the built-in task's data when the task is a built-in one."""
    from expert_hub.tasks import BUILTIN_TASKS

    if data is not None:
        return data
    if task in BUILTIN_TASKS:
        return builtin_data(task, split)
    hint = f"{task!r} is not a built-in task" if task else "no --task given"
    raise InvalidInputError(f"give --data FILE ({hint}; built-in tasks: {', '.join(BUILTIN_TASKS)})")
