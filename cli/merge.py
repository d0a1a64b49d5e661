"""`merge`: tasks' experts written into a copy of the base, as a full checkpoint any runtime loads."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .app import AUTO_DTYPE, DType, app, base_or_demo, console, progress_bar

OnOverlap = Enum("OnOverlap", {"refuse": "refuse", "first": "first"}, type=str)


@app.command()
def merge(
    tasks: Annotated[
        str,
        typer.Argument(
            metavar="TASK[,TASK...]",
            help="Registry references (law, law@2) or adapter directories, comma-separated; their experts must not "
            "overlap.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="The model directory to write (must not exist yet, or be empty).")],
    base: Annotated[
        str | None,
        typer.Option(
            help="Base MoE model: a local directory or a Hub id [default: the demo base shipped in the package]."
        ),
    ] = None,
    dtype: Annotated[DType, typer.Option(help="Weights dtype; auto keeps the base checkpoint's own.")] = AUTO_DTYPE,
    on_overlap: Annotated[
        OnOverlap,
        typer.Option(help="When two tasks trained the same expert: refuse, or let the first task named keep it."),
    ] = OnOverlap.refuse,
    force: Annotated[
        bool, typer.Option("--force", help="Merge into a base whose weights differ from those a task was trained on.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.")] = False,
) -> None:
    """Write a full checkpoint of the base with the tasks' experts in place, shard by shard (resumable)."""
    from expert_hub.merge import plan_merge

    references = [reference.strip() for reference in tasks.split(",") if reference.strip()]
    plan = plan_merge(base_or_demo(base), references, out, dtype.value, on_overlap.value, force, overwrite)
    with progress_bar("shards") as progress:
        bar = progress.add_task("merging", total=len(plan.checkpoint.files))
        result = plan.write(progress=lambda _: progress.advance(bar))
    names = ", ".join(task.name for task in result.tasks)
    console.print(
        f"Merged {names} into {result.directory}: {result.shards_rewritten} shards rewritten, "
        f"{result.shards_copied} copied"
        + (f", {result.shards_resumed} kept from the interrupted run" if result.shards_resumed else "")
    )
    for name, pairs in result.overridden.items():
        console.print(f"{name}: {len(pairs)} of its experts were taken by an earlier task (--on-overlap first)")
