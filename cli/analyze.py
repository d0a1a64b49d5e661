"""`expert-hub analyze`: the paper's routing figures and tables, for score files, published scores and adapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from expert_hub.analysis import LEVELS
from expert_hub.errors import InvalidInputError
from expert_hub.routing import DEFAULT_SCORE_TOKENS

from .app import TOKEN_SCORES, AsJson, ScoreFunction, app, check_output_file, console, status_console

if TYPE_CHECKING:
    from expert_hub.adapter import AdapterHeader
    from expert_hub.analysis import TaskAnalysis
    from expert_hub.scores import ExpertScores
    from expert_hub.scores import ScoreFunction as ScoreName

REPORT_FILE = "analysis.json"
PUBLISHED_SCORES = "summary.json"  # the reference repo's name for a task's scores


@dataclass
class _Source:
    """What one SOURCE argument gave: scores (a score file or published folder) or an adapter directory."""

    name: str
    source: str
    scores: ExpertScores | None = None
    adapter: AdapterHeader | None = None  # its selection and metadata; the weights load only for --base
    directory: Path | None = None


@app.command()
def analyze(
    sources: Annotated[
        list[str],
        typer.Argument(
            metavar="SOURCE",
            help="Score files (expert-hub's or a published summary.json), folders holding a summary.json, "
            "adapter directories or registered tasks (law, law@2).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for the PNG figures and analysis.json.")] = Path("analysis"),
    score: Annotated[ScoreFunction, typer.Option(help="Scores to analyse and select by.")] = TOKEN_SCORES,
    top_p: Annotated[
        float | None,
        typer.Option(
            help="Cumulative score per layer that selects a scored task's experts; default 0.2 token / 0.1 gate."
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(help="The adapters' base model: measures how far each trained expert moved, and scores --data."),
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="FILE",
            help="Task data (JSONL) to score on --base for the adapter sources: one per adapter, in order.",
        ),
    ] = None,
    tokens: Annotated[int, typer.Option(min=1, help="Tokens of each --data file to score.")] = DEFAULT_SCORE_TOKENS,
    seq_len: Annotated[int, typer.Option(min=1, help="Longest scored sequence; longer ones are cut.")] = 4096,
    as_json: AsJson = False,
) -> None:
    """Routing heatmaps, concentration, overlap between tasks and, for adapters, how far each trained expert moved.

    Writes heatmap.png (expert shares per layer, one panel per task), concentration.png (experts covering 50 / 80 /
    95% of each layer's routing, against uniform routing), overlap.png (Jaccard similarity of the tasks' selected
    experts), weight_change.png (adapters with --base) and analysis.json (every number) into --out.
    """
    from expert_hub.adapter import ExpertAdapter
    from expert_hub.analysis import TaskAnalysis, report, weight_change
    from expert_hub.models import load_base
    from expert_hub.selection import DEFAULT_TOP_P, select_experts

    check_output_file(out / REPORT_FILE)
    data = data or []
    if data and base is None:
        raise InvalidInputError("--data is scored on a model: give --base MODEL too")
    found = [_read_source(source, base) for source in sources]
    adapters = [source for source in found if source.adapter is not None]
    if data and len(data) != len(adapters):
        raise InvalidInputError(
            f"give one --data file per adapter source, in the same order: {len(adapters)} adapters, {len(data)} files"
        )
    if missing := [file for file in data if not file.is_file()]:  # before any model is loaded
        raise InvalidInputError(f"data file not found: {missing[0]}")
    by = score.value
    top_p = DEFAULT_TOP_P[by] if top_p is None else top_p
    tasks = []
    for source, name in zip(found, _unique(source.name for source in found)):
        if source.adapter is not None:
            tasks.append(TaskAnalysis(name, source.source, source.adapter.selection))
        else:
            assert source.scores is not None  # a source gives scores or an adapter (`_read_source`)
            selection = select_experts(source.scores, by=by, top_p=top_p)
            tasks.append(TaskAnalysis(name, source.source, selection, scores=source.scores))
    adapter_tasks = [task for task, source in zip(tasks, found) if source.adapter is not None]
    if base is not None and adapters:  # first: an adapter of another base fails before any data is scored
        with status_console.status(f"Loading {base}"):
            model = load_base(base)
        for task, source in zip(adapter_tasks, adapters):
            assert source.directory is not None  # an adapter source is read from its directory
            task.weight_change = weight_change(ExpertAdapter.load(source.directory), model)
        del model  # scoring loads the base its own way; never hold two copies
    if base is not None:  # --data comes with --base (checked above)
        for task, file in zip(adapter_tasks, data):
            task.scores = _score_data(base, file, tokens, seq_len)
    numbers = report(tasks, by, top_p, LEVELS)
    numbers["files"] = [str(path) for path in _draw(tasks, numbers, by, out)]
    if as_json:
        console.print_json(data=numbers)
        return
    _print_tables(tasks, numbers, by, top_p)
    console.print(f"Wrote {', '.join(Path(f).name for f in numbers['files'])} -> {out}")


def _read_source(source: str, base: str | None) -> _Source:
    """A score file, a folder holding a published summary.json, an adapter directory, or else a registered task."""
    from expert_hub.adapter import CONFIG_FILE, AdapterHeader
    from expert_hub.loading import resolve_adapter
    from expert_hub.registry import RegistryDamagedError, RegistryError
    from expert_hub.scores import ExpertScores

    path = Path(source)
    if path.is_file():  # a published `{task}/summary.json` is named after its folder
        name = path.resolve().parent.name if path.name == PUBLISHED_SCORES else path.stem
        return _Source(name, source, scores=ExpertScores.load(path))
    if path.is_dir() and (path / PUBLISHED_SCORES).is_file():
        return _Source(path.resolve().name, source, scores=ExpertScores.load(path / PUBLISHED_SCORES))
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        raise InvalidInputError(
            f"{source} holds neither {PUBLISHED_SCORES} (scores) nor {CONFIG_FILE} (an expert adapter)"
        )
    try:
        directory = resolve_adapter(source, base)
    except RegistryDamagedError:
        raise
    except (RegistryError, InvalidInputError) as error:
        raise InvalidInputError(f"{source} is not a file, a folder or a registered task: {error}") from error
    header = AdapterHeader.read(directory)
    return _Source(header.metadata.task or directory.resolve().name, source, adapter=header, directory=directory)


def _unique(names) -> list[str]:
    """Task names as given, with `-2`, `-3`, ... added to repeats, so every figure panel and JSON key is distinct."""
    taken: list[str] = []
    for name in names:
        unique, count = name, 1
        while unique in taken:
            count += 1
            unique = f"{name}-{count}"
        taken.append(unique)
    return taken


def _score_data(base: str, data: Path, tokens: int, seq_len: int) -> ExpertScores:
    """The adapter's task data scored on the base, as `expert-hub score` does (the routing ESFT selects from)."""
    from .scoring_commands import ScoreConfig, score_data

    return score_data(ScoreConfig(base=base, data=str(data), tokens=tokens, seq_len=seq_len))


def _draw(tasks: list[TaskAnalysis], numbers: dict, by: ScoreName, out: Path) -> list[Path]:
    """The figures the tasks allow: routing needs scores, overlap two tasks, weight change an adapter and a base."""
    from expert_hub import plots
    from expert_hub.analysis import concentration, routing_shares
    from expert_hub.io import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    scored = {task.name: task.scores for task in tasks if task.scores is not None}
    written = []
    if scored:
        shares = {name: routing_shares(scores, by) for name, scores in scored.items()}
        written.append(plots.routing_heatmaps(shares, by, out / "heatmap.png"))
        concentrations = {name: concentration(scores, by, LEVELS) for name, scores in scored.items()}
        written.append(plots.concentration_curves(concentrations, by, out / "concentration.png"))
    if len(tasks) > 1:
        overlap = numbers["overlap"]
        written.append(plots.overlap_matrix(overlap["tasks"], overlap["jaccard"], out / "overlap.png"))
    if changes := {task.name: task.weight_change for task in tasks if task.weight_change}:
        written.append(plots.weight_changes(changes, out / "weight_change.png"))
    write_json_atomic(out / REPORT_FILE, numbers)
    return [*written, out / REPORT_FILE]


def _print_tables(tasks: list[TaskAnalysis], numbers: dict, by: str, top_p: float) -> None:
    table = Table(
        "task",
        "layers",
        *(f"{level:.0%}" for level in LEVELS),
        "selected",
        title=f"Routing concentration ({by} scores)",
        caption="Mean experts per layer covering each share of the routing (uniform routing in brackets); "
        f"scored tasks select at top-p {top_p:g}",
    )
    for task in tasks:
        entry = numbers["tasks"][task.name]
        layers = len(task.selection.experts)
        selected = f"{entry['selected_experts']} ({entry['selected_experts'] / max(layers, 1):.1f} per layer)"
        if result := entry.get("concentration"):
            cells = [f"{mean:.1f} ({uniform:g})" for mean, uniform in zip(result["mean"], result["mean_uniform"])]
        else:
            cells = ["-"] * len(LEVELS)
        table.add_row(task.name, str(layers), *cells, selected)
    console.print(table)
    if len(tasks) > 1:
        names = numbers["overlap"]["tasks"]
        overlap = Table("", *names, title="Overlap (Jaccard)")
        for name, row in zip(names, numbers["overlap"]["jaccard"]):
            overlap.add_row(name, *(f"{value:.2f}" for value in row))
        console.print(overlap)
    if moved := [task for task in tasks if task.weight_change]:
        changes = Table("task", "experts", "mean", "min", "max", title="Relative weight change of the trained experts")
        for task in moved:
            values = [value for experts in (task.weight_change or {}).values() for value in experts.values()]
            changes.add_row(
                task.name,
                str(len(values)),
                *(f"{v:.2e}" for v in (sum(values) / len(values), min(values), max(values))),
            )
        console.print(changes)
