"""`eval`: a model, with or without an adapter, on task data (any metric, an LLM judge included) and on
lm-evaluation-harness tasks for its general abilities."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rich.table import Table

from expert_hub.errors import InvalidInputError
from expert_hub.evaluation import METRICS
from expert_hub.judge import JUDGE_TASKS, JudgeConfig
from expert_hub.settings import DTYPES, setting

from .app import (
    DEVICE_HELP,
    JSON_HELP,
    TRUST_REMOTE_CODE_HELP,
    app,
    base_or_demo,
    console,
    data_or_builtin,
    progress_bar,
    status_console,
)
from .config_options import config_values, with_config_options


@dataclass(frozen=True)
class EvalConfig:
    """What `expert-hub eval` measures, on which model, and how; each option declared once."""

    base: str | None = setting(
        None,
        default_help="the demo base",
        help="Base model (a directory or Hub id), or a full fine-tuned checkpoint.",
    )
    data: str | None = setting(
        None,
        default_help="the built-in task's eval split",
        help="Eval data: the reference eval JSONL (prompt / raw_answers), conversations, or a Hugging Face dataset.",
    )
    task: str | None = setting(
        None,
        default_help="--adapter's name when it is one",
        help="A built-in task: its eval split, metric and answer length are the defaults.",
    )
    adapter: str | None = setting(
        None,
        path=True,
        help="An expert adapter or a PEFT (LoRA) adapter directory, or a registered task (law, law@2).",
    )
    metric: str | None = setting(
        None,
        choices=METRICS,
        default_help="the built-in task's, else loss",
        help="loss (and perplexity), exact match, intent (JSON intent + slots), bleu, or judge (an LLM judge's 0-10 "
        "score as 0-1: see --judge-url).",
    )
    judge_url: str | None = setting(
        None, help="--metric judge: the judge's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."
    )
    judge_model: str | None = setting(None, help="--metric judge: the judge's model name.")
    judge_key_env: str | None = setting(
        None,
        default_help="none sent",
        help="--metric judge: the environment variable holding the judge's API key.",
    )
    judge_task: str | None = setting(
        None,
        choices=tuple(JUDGE_TASKS),
        default_help="--task's, when it is one of these",
        help="--metric judge: whose prompt the judge gets.",
    )
    judge_concurrency: int = setting(8, min=1, help="--metric judge: requests at once.")
    judge_cache: str | None = setting(
        None,
        path=True,
        default_help="judge-cache.sqlite in the expert-hub home",
        help="--metric judge: SQLite file of judgements, so a rerun asks nothing twice.",
    )
    split: str = setting("test", help="Split of a Hugging Face dataset.")
    chat_template: bool = setting(
        False, flags=("--chat-template",), help="Render conversations with the tokenizer's chat template."
    )
    max_new_tokens: int | None = setting(
        None, min=1, default_help="128, or the built-in task's", help="Longest generated answer."
    )
    batch_size: int = setting(8, min=1, help="Records per forward / generate call.")
    limit: int | None = setting(
        None, min=1, help="Evaluate only the first N records (and documents of each --lm-eval task)."
    )
    dtype: str = setting("auto", choices=DTYPES, help="Weights dtype.")
    device: str | None = setting(None, help=DEVICE_HELP)
    force: bool = setting(
        False, flags=("--force",), help="Apply an expert adapter even if the base fingerprint differs."
    )
    as_json: bool = setting(False, flags=("--json",), help=JSON_HELP)
    trust_remote_code: bool = setting(False, help=TRUST_REMOTE_CODE_HELP)
    lm_eval: str | None = setting(
        None,
        flags=("--lm-eval",),
        metavar="TASKS",
        help="General abilities: lm-evaluation-harness tasks (or groups, tags), comma-separated, e.g. "
        "hellaswag,arc_easy, run on the model with its adapter; needs the lm-eval extra. Alone it replaces the "
        "task-data evaluation; with --data, --task or --metric both run, into one table / JSON.",
    )
    num_fewshot: int | None = setting(
        None, min=0, default_help="each task's own", help="--lm-eval: few-shot examples per prompt."
    )
    lm_eval_include: str | None = setting(
        None,
        path=True,
        metavar="DIR",
        help="--lm-eval: a directory of your own lm-eval task YAMLs (relative data_files paths are read from the "
        "working directory).",
    )

    @property
    def task_eval(self) -> bool:
        """Whether task data is evaluated: unless --lm-eval is given alone."""
        return self.lm_eval is None or any(option is not None for option in (self.data, self.task, self.metric))


def _judge_config(config: EvalConfig) -> JudgeConfig | None:
    """The judge of `--metric judge`, checked before the model loads, so that a missing option or key fails at once."""
    if config.metric != "judge":
        options = (config.judge_url, config.judge_model, config.judge_key_env, config.judge_task, config.judge_cache)
        if any(option is not None for option in options):
            raise InvalidInputError("the --judge-* options are for --metric judge")
        return None
    if not config.judge_url or not config.judge_model:
        raise InvalidInputError(
            "--metric judge needs --judge-url URL and --judge-model NAME (an OpenAI-compatible API)"
        )
    name = config.judge_task or config.task
    if name not in JUDGE_TASKS:
        hint = f"task {config.task!r} has no judge prompt" if config.task else "no --task to take it from"
        raise InvalidInputError(f"give --judge-task {'|'.join(JUDGE_TASKS)} ({hint})")
    cache = Path(config.judge_cache) if config.judge_cache else None
    judge = JudgeConfig(
        config.judge_url, config.judge_model, name, config.judge_key_env, config.judge_concurrency, cache=cache
    )
    judge.api_key()
    return judge


def _lm_eval_tasks(config: EvalConfig):
    """--lm-eval's tasks (an `LMEvalTasks`), found before the model loads: a missing lm-eval or a mistyped task
    name fails in seconds, not after minutes of loading."""
    if config.lm_eval is None:
        if config.num_fewshot is not None or config.lm_eval_include is not None:
            raise InvalidInputError("--num-fewshot and --lm-eval-include are for --lm-eval TASKS")
        return None
    from expert_hub.general_eval import LMEvalTasks

    names = [name.strip() for name in config.lm_eval.split(",") if name.strip()]
    include = Path(config.lm_eval_include) if config.lm_eval_include else None
    with status_console.status("Finding lm-eval tasks"):
        return LMEvalTasks.find(names, include)


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
@with_config_options(EvalConfig)
def evaluate(**settings) -> None:
    """Evaluate a base model, optionally with an adapter, on task data (or a built-in task's eval split), and on
    lm-evaluation-harness tasks for its general abilities (--lm-eval)."""
    config = _with_task_defaults(EvalConfig(**config_values(EvalConfig, settings)))
    judge = _judge_config(config)  # what could fail is checked before the model loads
    general_tasks = _lm_eval_tasks(config)
    model, tokenizer = _load(config)
    result = _evaluate_task_data(config, model, tokenizer, judge) if config.metric else {}
    if general_tasks is not None:
        from expert_hub.general_eval import lm_eval_scores

        limit, shots, batch = config.limit, config.num_fewshot, config.batch_size
        result["lm_eval"] = lm_eval_scores(model, tokenizer, general_tasks, limit, shots, batch)
    result |= {"base": config.base, "adapter": config.adapter, "data": config.data}
    _print_result(result, config.metric, config.as_json)


def _with_task_defaults(config: EvalConfig) -> EvalConfig:
    """The settings left out, filled in: the demo base; the task an adapter is named after; a built-in task's eval
    data, metric and answer length (loss and 128 tokens otherwise); no data or metric for --lm-eval alone."""
    from expert_hub.tasks import BUILTIN_TASKS

    task, adapter = config.task, config.adapter
    if task is None and adapter is not None and not Path(adapter).exists() and adapter.split("@")[0] in BUILTIN_TASKS:
        task = adapter.split("@")[0]
    builtin = BUILTIN_TASKS.get(task) if task else None
    task_eval = config.task_eval
    return replace(
        config,
        base=base_or_demo(config.base),
        task=task,
        data=data_or_builtin(config.data, task, "eval") if task_eval else None,
        metric=(config.metric or (builtin.metric if builtin else "loss")) if task_eval else None,
        max_new_tokens=config.max_new_tokens or (builtin.max_new_tokens if builtin else 128),
    )


def _load(config: EvalConfig):
    """The model (with its adapter) on its device, and its tokenizer."""
    from expert_hub import load_model
    from expert_hub.models import load_tokenizer, resolve_device

    base, adapter, trust = config.base, config.adapter, config.trust_remote_code
    assert base is not None  # filled in by `_with_task_defaults`
    device = resolve_device(config.device)  # a device that is not there fails before minutes of loading
    with status_console.status(f"Loading {base}" + (f" with {adapter}" if adapter else "")):
        model = load_model(
            base, Path(adapter) if adapter else None, force=config.force, dtype=config.dtype, trust_remote_code=trust
        )
        model.to(device)
        tokenizer = load_tokenizer(base, trust_remote_code=trust)
    return model, tokenizer


def _evaluate_task_data(config: EvalConfig, model, tokenizer, judge: JudgeConfig | None) -> dict:
    """The task-data metric, with a progress bar (and one for the judge's answers)."""
    from expert_hub.evaluation import evaluate as run_evaluation

    metric, data, max_new_tokens = config.metric, config.data, config.max_new_tokens
    assert metric and data and max_new_tokens  # filled in by `_with_task_defaults` for a task-data evaluation
    with progress_bar("records") as progress:
        bar = progress.add_task(f"Evaluating ({metric})", total=None)
        judging = progress.add_task("Judging", total=None, visible=False)
        return run_evaluation(
            model,
            tokenizer,
            data,
            metric,
            split=config.split,
            chat_template=config.chat_template,
            max_new_tokens=max_new_tokens,
            batch_size=config.batch_size,
            limit=config.limit,
            on_records=lambda done, total: progress.update(bar, advance=done, total=total),
            judge=judge,
            on_judged=lambda done, total: progress.update(judging, advance=done, total=total, visible=True),
        )


def _print_result(result: dict, metric: str | None, as_json: bool) -> None:
    """The scores as JSON or as a table, after a warning when some judgements held no score."""
    value_name = metric or "value"
    if result.get("unparseable"):
        status_console.print(
            f"warning: {result['unparseable']} of {result['count']} judgements hold no score; {value_name} is the "
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
                value_name if key == "value" else key, f"{value:.4f}" if isinstance(value, float) else str(value)
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
