"""`train`: a task's experts (or a baseline), with a progress bar, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from expert_hub.demo import demo_base
from expert_hub.models import base_metadata
from expert_hub.training import TrainingConfig, base_training_defaults, get_method

from .app import app, base_or_demo, console, data_or_builtin, status_console
from .config_options import config_values, with_config_options

_DEMO_DEFAULTS = base_metadata(demo_base()).get("training_defaults", {})


def _demo_note(setting: str) -> str:
    """The demo base's own default for `setting`, as it ships it, for --help."""
    value = _DEMO_DEFAULTS.get(setting, "-")
    if isinstance(value, bool):
        value = "on" if value else "off"
    return f"; the demo base: {value:g}" if isinstance(value, float) else f"; the demo base: {value}"


@app.command()
@with_config_options(TrainingConfig, base_note=_demo_note)
def train(
    task: Annotated[
        str,
        typer.Option(
            help="Task name, e.g. law; names the output and the adapter. A built-in task (`expert-hub tasks`) brings its own data."
        ),
    ],
    base: Annotated[
        str | None,
        typer.Option(
            help="Base MoE model: a local directory or a Hub id [default: the demo base shipped in the package]."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help='Training data: JSONL of {"messages": [...]} lines, or a Hugging Face dataset (saved directory or name) [default: the built-in task\'s train split].'
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default runs/TASK-METHOD); rerunning on it resumes.")
    ] = None,
    register: Annotated[
        bool, typer.Option(help="Add the trained experts to the local registry (ESFT methods).")
    ] = True,
    **settings,
) -> None:
    """Train a task's experts with ESFT (or a full / LoRA baseline); resumable, with checkpoints.

    With no --base and --data, `expert-hub train --task law` trains the demo base on the built-in law data with
    ESFT-Token in a few minutes on 2 CPU cores: a base may ship its own training defaults (the demo base does),
    and every option given here overrides them. Every other option is a field of `TrainingConfig`.
    """
    from expert_hub.registry import Registry, validate_task_name
    from expert_hub.registry.store import normalize_base

    values = config_values(TrainingConfig, settings)
    validate_task_name(task)  # it names the output directory and the registry entry
    method = get_method(values["method"])
    if register and method.ships_expert_adapter:
        Registry().check_writable()
    base = normalize_base(base_or_demo(base))  # absolute: the artifacts find a local base from anywhere
    data = data_or_builtin(data, task, "train")
    config = TrainingConfig(
        **base_training_defaults(base) | values,
        task=task,
        base=base,
        data=data,
        out=str(out or Path("runs") / f"{task}-{method.name}"),
    )
    result = run_with_progress(config)
    if result is None:
        return
    if register and method.ships_expert_adapter:
        entry = Registry().register(result.artifact, task=task, base=base)
        console.print(f"Registered {entry.ref} ({entry.digest[:12]}); use it as `--adapter {task}` or in `serve`")


def run_with_progress(config):
    """Run training with a rich progress bar; returns the result on the main process, None on the others."""
    from expert_hub.training import train as run_training

    task, method, steps = config.task, config.method, config.steps
    progress = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("eval {task.fields[eval_loss]}"),
        TextColumn("{task.fields[tokens_per_second]} tok/s"),
        TimeRemainingColumn(),
        console=status_console,
    )
    bar = progress.add_task(f"Training {task} ({method})", total=steps, loss="-", eval_loss="-", tokens_per_second="-")

    def on_status(message: str) -> None:  # the bar appears with the first news: bad input fails without one
        progress.start()
        progress.console.print(message)

    def on_step(report) -> None:
        progress.update(
            bar,
            completed=report.step,
            loss=f"{report.loss:.4f}",
            eval_loss="-" if report.eval_loss is None else f"{report.eval_loss:.4f}",
            tokens_per_second=f"{report.tokens_per_second:,.0f}",
        )

    try:
        result = run_training(config, on_step=on_step, on_status=on_status)
        progress.update(bar, completed=steps)
    finally:
        if progress.live.is_started:
            progress.stop()
    if not result.main_process:
        return None
    losses = ", ".join(
        f"{name} {value:.4f}"
        for name, value in (("train loss", result.train_loss), ("eval loss", result.eval_loss))
        if value is not None
    )
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    if result.shipped_step != result.steps:
        losses += f" (the weights of step {result.shipped_step}, the lowest eval loss; --keep last for the final step)"
    console.print(f"Trained {result.steps} steps in {result.seconds:.1f}s{resumed}; {losses} -> {result.artifact}")
    return result
