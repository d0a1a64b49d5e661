"""Training commands: `train` a task's experts (or a baseline), `eval` a model with or without an adapter."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from expert_hub.demo import base_metadata, demo_base
from expert_hub.evaluation import METRICS
from expert_hub.training import TrainingConfig, base_training_defaults, get_method

from .app import DType, app, base_or_demo, console, data_or_builtin, progress_bar, status_console
from .config_options import config_values, with_config_options

_DEMO_DEFAULTS = base_metadata(demo_base()).get("training_defaults", {})


Metric = Enum("Metric", {name: name for name in METRICS}, type=str)


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


@app.command(name="eval")
def evaluate(
    base: Annotated[
        str | None,
        typer.Option(
            help="Base model (a directory or Hub id), or a full fine-tuned checkpoint [default: the demo base]."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Eval data: the reference eval JSONL (prompt / raw_answers), conversations, or a Hugging Face dataset [default: the built-in task's eval split]."
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="A built-in task: its eval split, metric and answer length are the defaults [default: --adapter's name when it is one]."
        ),
    ] = None,
    adapter: Annotated[
        Path | None,
        typer.Option(help="An expert adapter or a PEFT (LoRA) adapter directory, or a registered task (law, law@2)."),
    ] = None,
    metric: Annotated[
        Metric | None,
        typer.Option(
            help="loss (and perplexity), exact match, intent (JSON intent + slots) or bleu [default: the built-in task's, else loss]."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Split of a Hugging Face dataset.")] = "test",
    chat_template: Annotated[
        bool, typer.Option("--chat-template", help="Render conversations with the tokenizer's chat template.")
    ] = False,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Longest generated answer [default: 128, or the built-in task's].")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Records per forward / generate call.")] = 8,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N records.")] = None,
    dtype: Annotated[DType, typer.Option(help="Weights dtype.")] = DType.auto,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when available).")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Apply an expert adapter even if the base fingerprint differs.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Run the model repo's own code (only if you trust it).")
    ] = False,
) -> None:
    """Evaluate a base model, optionally with an adapter, on task data (or a built-in task's eval split)."""
    from expert_hub import load_model
    from expert_hub.evaluation import evaluate as run_evaluation
    from expert_hub.models import load_tokenizer, resolve_device
    from expert_hub.tasks import BUILTIN_TASKS

    base = base_or_demo(base)
    if task is None and adapter is not None and not adapter.exists() and str(adapter).split("@")[0] in BUILTIN_TASKS:
        task = str(adapter).split("@")[0]
    data = data_or_builtin(data, task, "eval")
    builtin = BUILTIN_TASKS.get(task)
    metric = metric or Metric(builtin.metric if builtin else "loss")
    max_new_tokens = max_new_tokens or (builtin.max_new_tokens if builtin else 128)

    device = resolve_device(device)
    with status_console.status(f"Loading {base}" + (f" with {adapter}" if adapter else "")):
        model = load_model(base, adapter, force=force, dtype=dtype.value, trust_remote_code=trust_remote_code).to(
            device
        )
        tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
    with progress_bar("records") as progress:
        bar = progress.add_task(f"Evaluating ({metric.value})", total=None)
        result = run_evaluation(
            model,
            tokenizer,
            data,
            metric.value,
            split=split,
            chat_template=chat_template,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            limit=limit,
            on_records=lambda done, total: progress.update(bar, advance=done, total=total),
        )
    result |= {"base": base, "adapter": str(adapter) if adapter else None, "data": data}
    if as_json:
        console.print_json(data=result)
        return
    table = Table(show_header=False)
    for key in ("value", "perplexity", "tokens", "count", "base", "adapter", "data"):
        if result.get(key) is not None:
            value = result[key]
            table.add_row(
                metric.value if key == "value" else key, f"{value:.4f}" if isinstance(value, float) else str(value)
            )
    console.print(table)
