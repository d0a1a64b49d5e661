"""Auto routing from the command line: `profile` a task's prompts, and `route` a prompt to see which task it picks."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from expert_hub.auto_routing import DEFAULT_DEPTH, DEFAULT_THRESHOLD, DEFAULT_WINDOW
from expert_hub.errors import InvalidInputError

from .app import AsJson, app, base_or_demo, console, data_or_builtin, status_console

if TYPE_CHECKING:
    from expert_hub.registry import Entry, Registry

Base = Annotated[str | None, typer.Option(help="Base MoE model (directory or Hub id) [default: the demo base].")]
ProfileData = Annotated[
    Path | None,
    typer.Option(
        help="Task data (conversations): add the task's routing profile, measured on its prompts, for "
        '`"model": "auto"`.'
    ),
]


def profile_adder(data: Path | None, base: str | None) -> Callable[[Path], None] | None:
    """What `--profile-data` does to an adapter directory before it is registered: add the routing profile of the
    data's prompts on `base`, by default the base the adapter names."""
    if data is None:
        return None
    from expert_hub.adapter import AdapterHeader
    from expert_hub.auto_routing import profile_task_data

    if not data.is_file():
        raise InvalidInputError(f"--profile-data {data} is not a file")

    def add(directory: Path) -> None:
        model = base or AdapterHeader.read(directory).metadata.base_model
        if model is None:
            raise InvalidInputError("the adapter does not name its base model: give --base to profile it")
        with status_console.status(f"Profiling the prompts of {data} on {model}"):
            profile_task_data(model, data).save(directory)

    return add


def _adapter_directory(task: str, base: str, registry: Registry) -> tuple[Path, Entry | None]:
    """A task's adapter directory (a registry entry's stored object, or the directory itself) and its entry."""
    if Path(task).is_dir():
        return Path(task), None
    entry = registry.resolve(task, base)
    return registry.verify(entry), entry


@app.command()
def profile(
    task: Annotated[str, typer.Argument(help="A registered task (law, law@3) or an adapter directory.")],
    data: Annotated[
        Path | None, typer.Option(help="Task data (conversations); the prompts are profiled [default: built-in].")
    ] = None,
    base: Base = None,
    prompts: Annotated[int, typer.Option(min=1, help="How many of the data's prompts to profile.")] = 256,
) -> None:
    """Measure how the base routes a task's prompts, so `"model": "auto"` can choose the task.

    Training writes the profile itself; this adds one to an adapter that lacks it (a pulled published one, say).
    An adapter directory gets the file; a registered task gets a new version holding it.
    """
    from expert_hub.auto_routing import RoutingProfile, profile_task_data
    from expert_hub.registry import Registry

    base = base_or_demo(base)
    registry = Registry()
    directory, entry = _adapter_directory(task, base, registry)
    name = entry.task if entry else directory.name
    source = data_or_builtin(str(data) if data else None, name, "train")
    with status_console.status(f"Profiling {prompts} prompts of {source} on {base}"):
        measured = profile_task_data(base, source, prompts)
    if entry is None:
        console.print(f"Profiled {measured.tokens:,} prompt tokens -> {measured.save(directory)}")
        return
    if RoutingProfile.load(directory) == measured:  # a new version would hold the very same files
        console.print(f"Profiled {measured.tokens:,} prompt tokens: {entry.ref} already has this profile")
        return
    with tempfile.TemporaryDirectory() as scratch:
        copy = registry.export(entry.ref, Path(scratch) / "adapter", base=entry.base_model)
        measured.save(copy)
        new = registry.register(copy, task=entry.task, base=entry.base_model)
    console.print(f"Profiled {measured.tokens:,} prompt tokens -> registered {new.ref} ({entry.ref} with its profile)")


@app.command()
def route(
    prompt: Annotated[str, typer.Argument(help="The prompt, as a completions request would send it.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated candidates: registry names or adapter directories.")],
    base: Base = None,
    depth: Annotated[int, typer.Option(min=1, help="MoE layers the prompt runs through.")] = DEFAULT_DEPTH,
    threshold: Annotated[
        float, typer.Option(help="Lowest score (nats per selection over chance) that picks a task, else the base.")
    ] = DEFAULT_THRESHOLD,
    window: Annotated[
        int, typer.Option(min=0, help="Prompt tokens routed on, from its start (0: the whole prompt).")
    ] = DEFAULT_WINDOW,
    as_json: AsJson = False,
) -> None:
    """Show which task a prompt would be routed to by `"model": "auto"`, with every candidate's score."""
    from expert_hub.auto_routing import RoutingProfile, TaskRouter, check_prompt_text, completion_routing_ids
    from expert_hub.families import moe_layers
    from expert_hub.models import load_base, load_tokenizer
    from expert_hub.registry import Registry

    check_prompt_text(prompt)  # before the base is loaded
    base = base_or_demo(base)
    registry = Registry()
    profiles = {}
    for name in [t.strip() for t in tasks.split(",") if t.strip()]:
        directory, entry = _adapter_directory(name, base, registry)
        if (found := RoutingProfile.load(directory)) is None:
            raise InvalidInputError(f"{name} has no routing profile: add one with `expert-hub profile {name}`")
        profiles[entry.task if entry else directory.name] = found
    with status_console.status(f"Loading {base}"):
        model = load_base(base)
        router = TaskRouter(model, depth, threshold, window or None)
        token_ids = completion_routing_ids(prompt, load_tokenizer(base))
    layers = moe_layers(model)
    for name, found in profiles.items():
        try:
            found.check_fits([layer.index for layer in layers], layers[0].num_experts)
        except InvalidInputError as error:
            raise InvalidInputError(f"{name}: {error}") from error
    choice = router.route(token_ids, profiles)
    if as_json:
        answer = {"task": choice.task, "confidence": choice.confidence, "scores": choice.scores}
        console.print_json(json.dumps(answer, allow_nan=False))
        return
    routed = f"its first {window} tokens" if window else "the whole prompt"
    table = Table(title=f"Routing {routed} on the first {depth} MoE layers of {base}")
    for column in ("task", "score (nats/selection over chance)"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, score in choice.scores.items():
        table.add_row(name, f"{score:+.3f}")
    console.print(table)
    chosen = choice.task or f"the base model (no task reaches {threshold})"
    console.print(f"-> {chosen}; confidence {choice.confidence:.3f}")
