"""`tasks`: the built-in tasks (list them, export their data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .app import app, console

tasks_app = typer.Typer(
    help="The built-in tasks: generated data every command can use offline.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(tasks_app, name="tasks")


@tasks_app.callback()
def list_tasks(ctx: typer.Context) -> None:
    """List the built-in tasks: metric, split sizes, and the demo base's score on each (held-out tasks are new to it)."""
    if ctx.invoked_subcommand is not None:
        return
    from expert_hub.demo import demo_base
    from expert_hub.models import base_metadata
    from expert_hub.tasks import BUILTIN_TASKS

    scores = base_metadata(demo_base()).get("evaluation", {})
    table = Table(title="Built-in tasks (`expert-hub train --task NAME` trains the demo base on one)")
    for column in ("task", "metric", "train", "eval", "demo base", "score", "what"):
        table.add_column(column, justify="right" if column in ("train", "eval", "score") else "left")
    for name, task in BUILTIN_TASKS.items():
        score = scores.get(name, {}).get("value")
        table.add_row(
            name,
            task.metric,
            f"{task.train_size:,}",
            f"{task.eval_size:,}",
            "pretrained on" if task.in_demo_base else "held out",
            "-" if score is None else f"{score:.3f}",
            task.description,
        )
    console.print(table)


@tasks_app.command("export")
def export_task(
    name: Annotated[str, typer.Argument(help="A built-in task.")],
    directory: Annotated[Path, typer.Argument(help="Where to write train.jsonl and eval.jsonl.")],
    seed: Annotated[int, typer.Option(help="Draw other examples with another seed (0 is the built-in data).")] = 0,
) -> None:
    """Write a built-in task's train and eval splits as reference-format JSONL conversations."""
    from expert_hub.tasks import export

    paths = export(name, directory, seed=seed)
    for split, path in paths.items():
        console.print(f"{split}: {path}")
