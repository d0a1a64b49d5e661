"""The Typer app, the console and the small helpers every command shares."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from expert_hub.errors import InvalidInputError
from expert_hub.scores import SCORE_FUNCTIONS

app = typer.Typer(
    name="expert-hub",
    help="Expert-Specialized Fine-Tuning (ESFT) for Mixture-of-Experts models: score, select, train and share "
    "the routed experts a task uses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()  # results
status_console = Console(stderr=True)  # progress and status, so `--json` output stays clean

ScoreFunction = Enum("ScoreFunction", {name: name for name in SCORE_FUNCTIONS}, type=str)


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


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
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeRemainingColumn(),
        console=status_console,
    )
