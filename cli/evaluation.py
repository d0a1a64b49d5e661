"""`eval`: a model, with or without an adapter, on task data (any metric, an LLM judge included) and on
lm-evaluation-harness tasks for its general abilities."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from expert_hub.errors import InvalidInputError
from expert_hub.evaluation import METRICS
from expert_hub.judge import JUDGE_TASKS, JudgeConfig

from .app import (
    AsJson,
    Device,
    DType,
    TrustRemoteCode,
    app,
    base_or_demo,
    console,
    data_or_builtin,
    progress_bar,
    status_console,
)

Metric = Enum("Metric", {name: name for name in METRICS}, type=str)
JudgeTask = Enum("JudgeTask", {name: name for name in JUDGE_TASKS}, type=str)


def _judge_config(
    metric: Metric | None,
    task: str | None,
    url: str | None,
    model: str | None,
    key_env: str | None,
    judge_task: JudgeTask | None,
    concurrency: int,
    cache: Path | None,
) -> JudgeConfig | None:
    """The judge of `--metric judge`, checked before the model loads, so that a missing option or key fails at once."""
    if metric != Metric.judge:
        if any(option is not None for option in (url, model, key_env, judge_task, cache)):
            raise InvalidInputError("the --judge-* options are for --metric judge")
        return None
    if not url or not model:
        raise InvalidInputError(
            "--metric judge needs --judge-url URL and --judge-model NAME (an OpenAI-compatible API)"
        )
    name = judge_task.value if judge_task else task
    if name not in JUDGE_TASKS:
        hint = f"task {task!r} has no judge prompt" if task else "no --task to take it from"
        raise InvalidInputError(f"give --judge-task {'|'.join(JUDGE_TASKS)} ({hint})")
    config = JudgeConfig(url, model, name, key_env, concurrency, cache=cache)
    config.api_key()
    return config


def _lm_eval_tasks(names: str | None, num_fewshot: int | None, include: Path | None):
    """--lm-eval's tasks (an `LMEvalTasks`), found before the model loads: a missing lm-eval or a mistyped task
    name fails in seconds, not after minutes of loading."""
    if names is None:
        if num_fewshot is not None or include is not None:
            raise InvalidInputError("--num-fewshot and --lm-eval-include are for --lm-eval TASKS")
        return None
    from expert_hub.general_eval import LMEvalTasks

    with status_console.status("Finding lm-eval tasks"):
        return LMEvalTasks.find([name.strip() for name in names.split(",") if name.strip()], include)


def _add_lm_eval_rows(table: Table, scores: dict[str, dict]) -> None:
    """Each lm-eval task's metrics as `TASK METRIC | value ± stderr` rows, then the documents and shots it took."""
    for task, metrics in scores.items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or name in ("samples", "num_fewshot"):
                continue
            stderr = metrics.get(f"{name}_stderr")
            table.add_row(f"{task} {name}", f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
        if "samples" in metrics:
            shots = f", {metrics['num_fewshot']}-shot" if "num_fewshot" in metrics else ""
            table.add_row(f"{task} samples", f"{metrics['samples']}{shots}")


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
            help="loss (and perplexity), exact match, intent (JSON intent + slots), bleu, or judge (an LLM judge's 0-10 score as 0-1: see --judge-url) [default: the built-in task's, else loss]."
        ),
    ] = None,
    judge_url: Annotated[
        str | None,
        typer.Option(help="--metric judge: the judge's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."),
    ] = None,
    judge_model: Annotated[str | None, typer.Option(help="--metric judge: the judge's model name.")] = None,
    judge_key_env: Annotated[
        str | None,
        typer.Option(help="--metric judge: the environment variable holding the judge's API key [default: none sent]."),
    ] = None,
    judge_task: Annotated[
        JudgeTask | None,
        typer.Option(help="--metric judge: whose prompt the judge gets [default: --task's, when it is one of these]."),
    ] = None,
    judge_concurrency: Annotated[int, typer.Option(min=1, help="--metric judge: requests at once.")] = 8,
    judge_cache: Annotated[
        Path | None,
        typer.Option(
            help="--metric judge: SQLite file of judgements, so a rerun asks nothing twice [default: judge-cache.sqlite in the expert-hub home]."
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
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="Evaluate only the first N records (and documents of each --lm-eval task)."),
    ] = None,
    dtype: Annotated[DType, typer.Option(help="Weights dtype.")] = DType.auto,
    device: Device = None,
    force: Annotated[
        bool, typer.Option("--force", help="Apply an expert adapter even if the base fingerprint differs.")
    ] = False,
    as_json: AsJson = False,
    trust_remote_code: TrustRemoteCode = False,
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            metavar="TASKS",
            help="General abilities: lm-evaluation-harness tasks (or groups, tags), comma-separated, e.g. hellaswag,arc_easy, run on the model with its adapter; needs the lm-eval extra. Alone it replaces the task-data evaluation; with --data, --task or --metric both run, into one table / JSON.",
        ),
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(min=0, help="--lm-eval: few-shot examples per prompt [default: each task's own].")
    ] = None,
    lm_eval_include: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="--lm-eval: a directory of your own lm-eval task YAMLs (relative data_files paths are read from the working directory).",
        ),
    ] = None,
) -> None:
    """Evaluate a base model, optionally with an adapter, on task data (or a built-in task's eval split), and on
    lm-evaluation-harness tasks for its general abilities (--lm-eval)."""
    from expert_hub import load_model
    from expert_hub.evaluation import evaluate as run_evaluation
    from expert_hub.models import load_tokenizer, resolve_device
    from expert_hub.tasks import BUILTIN_TASKS

    base = base_or_demo(base)
    task_eval = lm_eval is None or any(option is not None for option in (data, task, metric))
    if task is None and adapter is not None and not adapter.exists() and str(adapter).split("@")[0] in BUILTIN_TASKS:
        task = str(adapter).split("@")[0]
    data = data_or_builtin(data, task, "eval") if task_eval else None
    builtin = BUILTIN_TASKS.get(task)
    metric = (metric or Metric(builtin.metric if builtin else "loss")) if task_eval else None
    max_new_tokens = max_new_tokens or (builtin.max_new_tokens if builtin else 128)
    judge = _judge_config(
        metric, task, judge_url, judge_model, judge_key_env, judge_task, judge_concurrency, judge_cache
    )
    general_tasks = _lm_eval_tasks(lm_eval, num_fewshot, lm_eval_include)

    device = resolve_device(device)
    with status_console.status(f"Loading {base}" + (f" with {adapter}" if adapter else "")):
        model = load_model(base, adapter, force=force, dtype=dtype.value, trust_remote_code=trust_remote_code).to(
            device
        )
        tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
    result = {}
    if task_eval:
        with progress_bar("records") as progress:
            bar = progress.add_task(f"Evaluating ({metric.value})", total=None)
            judging = progress.add_task("Judging", total=None, visible=False)
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
                judge=judge,
                on_judged=lambda done, total: progress.update(judging, advance=done, total=total, visible=True),
            )
    if general_tasks is not None:
        from expert_hub.general_eval import lm_eval_scores

        result["lm_eval"] = lm_eval_scores(model, tokenizer, general_tasks, limit, num_fewshot, batch_size)
    result |= {"base": base, "adapter": str(adapter) if adapter else None, "data": data}
    _print_result(result, metric, as_json)


def _print_result(result: dict, metric: Metric | None, as_json: bool) -> None:
    """The scores as JSON or as a table, after a warning when some judgements held no score."""
    if result.get("unparseable"):
        status_console.print(
            f"warning: {result['unparseable']} of {result['count']} judgements hold no score; {metric.value} is the "
            f"mean of the other {result['judged']} (as 0, they give {result['value_unparseable_as_zero']:.4f})"
        )
    if as_json:
        console.print_json(data=result)
        return
    table = Table(show_header=False)
    for key in _RESULT_ROWS:
        if key == "lm_eval" and key in result:
            _add_lm_eval_rows(table, result[key])
        elif result.get(key) is not None:
            value = result[key]
            table.add_row(
                metric.value if key == "value" else key, f"{value:.4f}" if isinstance(value, float) else str(value)
            )
    console.print(table)


_RESULT_ROWS = (
    "value",
    "perplexity",
    "tokens",
    "count",
    "judged",
    "unparseable",
    "cached",
    "lm_eval",
    "base",
    "adapter",
    "data",
)
