"""Registry commands: `import`, `export`, `list`, `show`, `rm`, and `push` / `pull` on the Hugging Face Hub."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .app import AsJson, app, console
from .auto_routing_commands import ProfileData, profile_adder

Base = Annotated[str | None, typer.Option(help="Only entries of this base model (directory or Hub id).")]


def _registry():
    from expert_hub.registry import Registry

    return Registry()


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 1024:.1f} KiB"


def _experts(entry) -> str:
    counts = list(entry.experts.values())
    if not counts:
        return "-"
    return f"{sum(counts)} in {len(counts)} layers ({min(counts)}-{max(counts)}/layer)"


@app.command(name="import")
def import_adapter(
    directory: Annotated[Path, typer.Argument(help="An adapter directory (expert-hub's or a published ESFT one).")],
    task: Annotated[str | None, typer.Option(help="Task name (default: the adapter's own).")] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model it was trained from (default: from its metadata).")
    ] = None,
    profile_data: ProfileData = None,
) -> None:
    """Register an existing adapter directory (or the run directory `train` wrote it in) as the next version."""
    if not (directory / "expert_cfg.json").exists() and (directory / "adapter" / "expert_cfg.json").is_file():
        directory = directory / "adapter"  # `expert-hub import runs/law-esft-token`
    add_profile = profile_adder(profile_data, base)
    with tempfile.TemporaryDirectory() as scratch:
        if add_profile is not None:  # into a copy of its files: the user's directory is left as it is
            directory = _copy_files(directory, Path(scratch) / directory.name)
            add_profile(directory)
        entry = _registry().register(directory, task=task, base=base)
    console.print(f"Registered {entry.ref} ({entry.digest[:12]}, {_size(entry.bytes)}) for base {entry.base_model}")


def _copy_files(directory: Path, copy: Path) -> Path:
    """The adapter's regular files (what the registry stores), refused as the registry refuses them: a link copied as
    a plain file would slip past that check."""
    from expert_hub.registry.store import refuse_links_and_special_files

    refuse_links_and_special_files(directory)
    copy.mkdir()
    for path in directory.iterdir():
        if path.is_file():
            shutil.copyfile(path, copy / path.name)
    return copy


@app.command()
def export(
    ref: Annotated[str, typer.Argument(metavar="TASK[@V]", help="law, law@3 or law@<hash prefix>.")],
    directory: Annotated[Path, typer.Argument(help="Where to write the adapter files (must not exist yet).")],
    base: Base = None,
) -> None:
    """Write a registered adapter out as a plain directory."""
    registry = _registry()
    entry = registry.resolve(ref, base)
    registry.export(entry.ref, directory, base=base)
    console.print(f"Exported {entry.ref} -> {directory}")


@app.command(name="list")
def list_entries(
    base: Base = None,
    as_json: AsJson = False,
) -> None:
    """Registered task experts: task, version, base, method, experts, size, created, metrics."""
    registry = _registry()
    entries = registry.entries(base)
    for why in registry.unreadable():  # named, never fatal: one bad record must not hide the others
        typer.echo(f"warning: skipped {why}", err=True)
    if as_json:
        console.print_json(data=[asdict(entry) for entry in entries])
        return
    if not entries:
        console.print("No task experts registered yet (`expert-hub train` or `expert-hub import` adds them).")
        return
    table = Table("task", "version", "base", "method", "experts", "size", "created", "metrics")
    for entry in sorted(entries, key=lambda e: (e.task, e.version)):
        metrics = " ".join(f"{name}={value:.4g}" for name, value in entry.metrics.items())
        table.add_row(
            entry.task,
            f"{entry.version} ({entry.digest[:8]})",
            str(entry.base_model),
            entry.method or "-",
            _experts(entry),
            _size(entry.bytes),
            entry.created,
            metrics or "-",
        )
    console.print(table)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(metavar="TASK[@V]", help="law, law@3 or law@<hash prefix>.")],
    base: Base = None,
    as_json: AsJson = False,
) -> None:
    """One entry in full, after verifying its files."""
    registry = _registry()
    entry = registry.resolve(ref, base)
    adapter = registry.load(entry.ref, base)
    details = asdict(entry) | {
        "path": str(registry.object_path(entry)),
        "metadata": asdict(adapter.metadata),
        "selection": adapter.selection.to_json(),
    }
    if as_json:
        console.print_json(data=details)
        return
    table = Table(show_header=False, title=entry.ref)
    for key in ("task", "version", "digest", "base_model", "base_fingerprint", "method", "created", "path"):
        table.add_row(key, str(details[key]))
    table.add_row("experts", _experts(entry))
    table.add_row("size", _size(entry.bytes))
    for name, value in entry.metrics.items():
        table.add_row(name, f"{value:.4g}")
    console.print(table)


@app.command(name="rm")
def remove(
    ref: Annotated[str, typer.Argument(metavar="TASK[@V]", help="law (every version) or law@3 (one version).")],
    base: Base = None,
) -> None:
    """Remove a task's versions from the registry."""
    removed = _registry().remove(ref, base)
    console.print("Removed " + ", ".join(entry.ref for entry in removed))


@app.command()
def push(
    ref: Annotated[str, typer.Argument(metavar="TASK[@V]", help="The registered experts to share.")],
    repo: Annotated[str, typer.Option(help="Hub repository, ORG/NAME (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to push to (created if missing).")] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    license: Annotated[str, typer.Option(help="License for the model card.")] = "other",
    base: Base = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            help="Hub id of the base model, when the experts were trained on a local copy of it: the card links it, and no local path is published."
        ),
    ] = None,
) -> None:
    """Upload a task's experts with a generated model card to the Hugging Face Hub (HF_TOKEN / `hf auth login`)."""
    from expert_hub.registry.hub import push as push_entry

    url = push_entry(
        _registry(),
        ref,
        repo,
        private=private,
        revision=revision,
        commit_message=commit_message,
        base=base,
        license=license,
        base_model=base_model,
    )
    console.print(f"Pushed {ref} -> {url}")


@app.command()
def pull(
    repo: Annotated[str, typer.Argument(metavar="ORG/NAME", help="Hub repository holding an expert adapter.")],
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit.")] = None,
    task: Annotated[
        str | None, typer.Option(help="Task name (default: the adapter's own, else the repo name).")
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model it was trained from (default: from its metadata).")
    ] = None,
    profile_data: ProfileData = None,
) -> None:
    """Download an adapter from the Hub (expert-hub's or a published ESFT one) and register it."""
    from expert_hub.registry.hub import pull as pull_entry

    add_profile = profile_adder(profile_data, base)
    entry = pull_entry(_registry(), repo, revision=revision, task=task, base=base, prepare=add_profile)
    console.print(f"Pulled {repo} as {entry.ref} ({entry.digest[:12]}, {_size(entry.bytes)})")
