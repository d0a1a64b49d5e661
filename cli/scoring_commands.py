"""Analysis commands: `score` task data, `select` experts, `inspect` a model or an adapter."""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from expert_hub.errors import InvalidInputError
from expert_hub.routing import DEFAULT_SCORE_TOKENS, DEFAULT_SEED
from expert_hub.settings import DTYPES, setting

from .app import (
    DEVICE_HELP,
    TOKEN_SCORES,
    TRUST_REMOTE_CODE_HELP,
    AsJson,
    ScoreFunction,
    TrustRemoteCode,
    app,
    base_or_demo,
    check_output_file,
    console,
    data_or_builtin,
    progress_bar,
    status_console,
)
from .config_options import config_values, with_config_options

if TYPE_CHECKING:
    from expert_hub.scores import ExpertScores


@dataclass(frozen=True)
class ScoreConfig:
    """What `expert-hub score` scores, on which model, and how; each option declared once."""

    base: str | None = setting(
        None, default_help="the demo base", help="Base MoE model: a local directory or a Hub id."
    )
    data: str | None = setting(None, path=True, help='Task data: JSONL of {"messages": [...]} lines.')
    task: str | None = setting(None, help="Score a built-in task's train split instead of --data.")
    tokens: int = setting(DEFAULT_SCORE_TOKENS, min=1, help="How many tokens of the data to score (paper: 2^17).")
    seed: int = setting(
        DEFAULT_SEED, help="Seed of the shuffle the scored conversations are drawn after (as `train`'s --seed)."
    )
    batch_size: int = setting(8, min=1, help="Sequences per forward pass.")
    seq_len: int = setting(4096, min=1, help="Longest sequence; longer conversations are cut.")
    dtype: str = setting("auto", choices=DTYPES, help="Weights dtype to load the model in.")
    device: str | None = setting(None, help=DEVICE_HELP)
    trust_remote_code: bool = setting(False, help=TRUST_REMOTE_CODE_HELP)
    routing_logs: str | None = setting(
        None, path=True, help="Score the reference repo's raw logs (expert_weights_<layer>.txt) instead."
    )
    top_k: int | None = setting(None, min=1, help="Experts per token in the routing logs.")
    num_experts: int | None = setting(None, min=1, help="Routed experts per layer in the logs.")


@app.command()
@with_config_options(ScoreConfig)
def score(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the scores JSON.")], **settings
) -> None:
    """Score every routed expert on task data: Token Selection Ratio and Average Gate Score per layer."""
    from expert_hub.scores import scores_from_routing_logs

    config = ScoreConfig(**config_values(ScoreConfig, settings))
    check_output_file(output)
    if config.routing_logs is not None:
        if config.base or config.data or config.task:
            raise InvalidInputError("use either --routing-logs or --base with --data / --task, not both")
        if config.top_k is None:
            raise InvalidInputError("--routing-logs needs --top-k (experts per token, 6 for DeepSeek-V2-Lite)")
        scores = scores_from_routing_logs(Path(config.routing_logs), top_k=config.top_k, num_experts=config.num_experts)
    else:
        data = data_or_builtin(config.data, config.task, "train")
        scores = score_data(replace(config, base=base_or_demo(config.base), data=data))
    scores.save(output)
    assert scores.counts is not None  # scores made here (not read from a summary) carry their counts
    tokens_seen = max(c.tokens for c in scores.counts.values())
    console.print(f"Scored {tokens_seen:,} tokens over {len(scores.token_scores)} MoE layers -> {output}")


def score_data(config: ScoreConfig) -> ExpertScores:
    """Score a seeded sample of `config.data` on `config.base` with a progress bar (`score`, and `analyze --data`)."""
    from expert_hub.data import read_conversations
    from expert_hub.models import load_base, load_tokenizer, resolve_device
    from expert_hub.routing import score_model, token_sequences

    base, trust = config.base, config.trust_remote_code
    assert base is not None and config.data is not None  # resolved by the caller (`score`, `analyze`)
    data = Path(config.data)
    on = resolve_device(config.device)
    conversations = read_conversations(data, config.seed)  # a sample of the whole file, drawn as the reference does
    first = next(conversations, None)  # fail on a missing or malformed file before loading weights
    if first is None:
        raise InvalidInputError(f"{data} holds no conversations")
    with status_console.status(f"Loading {base}"):
        model = load_base(base, dtype=config.dtype, trust_remote_code=trust)
        model.to(on)  # type: ignore[arg-type]  # transformers wraps PreTrainedModel.to; mypy reads it unbound
        tokenizer = load_tokenizer(base, trust_remote_code=trust)
    tokens, seq_len = config.tokens, config.seq_len
    sequences = token_sequences(chain([first], conversations), tokenizer, max_tokens=tokens, max_length=seq_len)
    with progress_bar("tokens") as progress:
        task = progress.add_task("Scoring", total=tokens)
        source = {"model": base, "data": str(data), "seed": config.seed, "tokens_requested": tokens, "seq_len": seq_len}
        scores = score_model(
            model,
            sequences,
            batch_size=config.batch_size,
            source=source,
            on_tokens=lambda n: progress.advance(task, n),
        )
        progress.update(task, total=progress.tasks[0].completed)
    return scores


@app.command()
def select(
    scores_file: Annotated[
        Path, typer.Argument(metavar="SCORES.json", help="Scores from `expert-hub score` or a published summary.json.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write expert_cfg.json.")],
    by: Annotated[ScoreFunction, typer.Option(help="Score to rank experts by.")] = TOKEN_SCORES,
    top_p: Annotated[
        float | None, typer.Option(help="Cumulative score to reach per layer, in (0, 1]; default 0.2 token / 0.1 gate.")
    ] = None,
    shared_experts: Annotated[bool, typer.Option("--shared-experts", help="Also train the shared experts.")] = False,
    non_expert_modules: Annotated[
        bool, typer.Option("--non-expert-modules", help="Also train every non-expert module.")
    ] = False,
) -> None:
    """Pick each layer's top experts until their scores sum to top-p (ESFT-Token / ESFT-Gate)."""
    from expert_hub.scores import ExpertScores
    from expert_hub.selection import select_experts

    check_output_file(output)
    selection = select_experts(
        ExpertScores.load(scores_file),
        by=by.value,
        top_p=top_p,
        shared_experts=shared_experts,
        non_expert_modules=non_expert_modules,
    )
    selection.save(output)
    table = Table("layer", "experts", "ids", title=f"Selected by {by.value} scores")
    for layer, ids in sorted(selection.experts.items()):
        table.add_row(str(layer), str(len(ids)), " ".join(map(str, ids)))
    console.print(table)
    console.print(f"{len(selection.pairs)} experts over {len(selection.experts)} layers -> {output}")


@app.command()
def inspect(
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="[MODEL_OR_ADAPTER]",
            help="A model (directory or Hub id) or an adapter directory [default: the demo base].",
        ),
    ] = None,
    as_json: AsJson = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Show a model's MoE layout (family, layers, experts, top-k) or an adapter's experts and size."""
    from expert_hub.adapter import CONFIG_FILE

    target = base_or_demo(target)
    if (Path(target) / CONFIG_FILE).is_file():
        _inspect_adapter(Path(target), as_json)
    else:
        _inspect_model(target, as_json, trust_remote_code)


def _inspect_model(target: str, as_json: bool, trust_remote_code: bool) -> None:
    from dataclasses import asdict

    from expert_hub.models import base_metadata, describe_model

    summary = describe_model(target, trust_remote_code=trust_remote_code)
    if as_json:
        console.print_json(data=asdict(summary))
        return
    table = Table(show_header=False, title=target)
    table.add_row("family", summary.family)
    table.add_row("layers", f"{summary.num_layers} ({len(summary.moe_layers)} MoE: {_ranges(summary.moe_layers)})")
    table.add_row("routed experts per layer", str(summary.num_experts))
    table.add_row("experts per token (top-k)", str(summary.top_k))
    table.add_row("shared experts", "yes" if summary.shared_experts else "no")
    table.add_row("parameters per expert", f"{summary.expert_parameters:,}")
    table.add_row("expert biases", "yes" if summary.expert_biases else "no")
    if recipe := base_metadata(target).get("recipe"):  # the demo base says how it was made
        table.add_row(
            "pretrained", f"{recipe['steps']:,} steps on {', '.join(recipe['data_mix'])} (seed {recipe['seed']})"
        )
        table.add_row("held-out tasks", ", ".join(recipe["held_out"]))
    console.print(table)


def _inspect_adapter(directory: Path, as_json: bool) -> None:
    from dataclasses import asdict

    from expert_hub.adapter import ExpertAdapter

    adapter = ExpertAdapter.load(directory)
    if as_json:
        console.print_json(
            data={
                "experts": adapter.selection.to_json(),
                "num_experts": len(adapter.selection.pairs),
                "bytes": adapter.nbytes,
                "metadata": asdict(adapter.metadata),
            }
        )
        return
    meta = adapter.metadata
    table = Table("layer", "experts", "ids", title=f"{directory} ({meta.task or 'untitled task'})")
    for layer, ids in sorted(adapter.selection.experts.items()):
        table.add_row(str(layer), str(len(ids)), " ".join(map(str, ids)))
    console.print(table)
    console.print(
        f"{len(adapter.selection.pairs)} experts, {adapter.nbytes / 2**20:.1f} MiB; "
        f"shared experts: {adapter.selection.shared_experts}, non-expert modules: {adapter.selection.non_expert_modules}"
    )
    if meta.base_model:
        console.print(
            f"base: {meta.base_model}  method: {meta.method or '-'}  fingerprint: {(meta.base_fingerprint or '-')[:12]}"
        )


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    spans, start = [], None
    for i, value in enumerate(values):
        start = value if start is None else start
        if i + 1 == len(values) or values[i + 1] != value + 1:
            spans.append(f"{start}-{value}" if value != start else str(value))
            start = None
    return ", ".join(spans)
