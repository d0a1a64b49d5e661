"""General abilities, through EleutherAI's lm-evaluation-harness (the optional `lm-eval` extra).

ESFT trains a few experts for one task and leaves the rest of the model as it was, so a model with a task's
adapter should keep its general abilities; `expert-hub eval --lm-eval hellaswag,arc_easy` measures them. lm-eval's
Hugging Face model class (`HFLM`) is wrapped around the model `load_model` gave, so lm-eval scores exactly that
model: the base with the adapter's expert rows copied in, or a PEFT (LoRA) model, on whatever device it is on.

`lm_eval_scores` returns `{task: {metric: value, f"{metric}_stderr": value, "samples": n, "num_fewshot": k}}`,
one entry per task or group lm-eval reports. A metric taken after one of the task's filters other than lm-eval's
default (`none`) is named `metric,filter`, as lm-eval names it (gsm8k's `exact_match,strict-match`). Standard
errors are lm-eval's: closed-form for means such as `acc`, a bootstrap of `BOOTSTRAP_ITERS` draws for corpus
metrics such as `bleu`; absent where lm-eval has none.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .errors import InvalidInputError
from .io import first_line

# lm-eval's own CLI draws 100000, which takes minutes per corpus metric on a CPU; 1000 draws estimate the standard
# error to within a few percent. Means such as `acc` have a closed form and draw nothing.
BOOTSTRAP_ITERS = 1000

_NOT_INSTALLED = "lm-eval is not installed: pip install 'expert-hub[lm-eval]'"


def _import_lm_eval():
    """lm-eval, imported only when asked for: it is an optional extra and takes seconds to import."""
    try:
        import lm_eval
    except ModuleNotFoundError as error:
        if error.name != "lm_eval":  # installed, but something it needs is missing: say what
            raise InvalidInputError(f"lm-eval cannot be imported: {first_line(error)}") from error
        raise InvalidInputError(_NOT_INSTALLED) from error
    return lm_eval


@dataclass(frozen=True)
class LMEvalTasks:
    """lm-eval tasks, found by name before any model loads, so that a mistyped name fails in seconds."""

    names: tuple[str, ...]
    manager: Any  # lm_eval.tasks.TaskManager, which indexed lm-eval's tasks and those under `include_path`

    @classmethod
    def find(cls, names: Sequence[str], include_path: str | Path | None = None) -> LMEvalTasks:
        """Tasks, groups or tags by lm-eval name (or task YAML path); `include_path` is a directory of your own
        task YAMLs, which win over lm-eval's tasks of the same name."""
        if not names:
            raise InvalidInputError("give lm-eval task names, e.g. hellaswag,arc_easy")
        if include_path is not None and not Path(include_path).is_dir():
            raise InvalidInputError(f"{include_path} is not a directory of lm-eval task YAMLs")
        _import_lm_eval()
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
        for name in names:
            if name not in manager.all_tasks and not Path(name).is_file():
                close = difflib.get_close_matches(name, manager.all_tasks, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise InvalidInputError(
                    f"unknown lm-eval task {name!r}{hint}; `lm-eval ls tasks` lists them "
                    "(`--lm-eval-include DIR` adds a directory of your own task YAMLs)"
                )
        return cls(tuple(names), manager)


def lm_eval_scores(
    model: nn.Module,
    tokenizer,
    tasks: LMEvalTasks,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float | int]]:
    """Run lm-eval's `tasks` on `model` as it is (adapter applied, on its device); the scores, as the module says.

    `limit` takes the first N documents of each task; `num_fewshot` overrides each task's own few-shot count
    (except where a task fixes it at 0). lm-eval's prints go to stderr, so that JSON on stdout stays whole.
    """
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # its warnings on a ready-made model are about options never passed here
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_logger.setLevel(level)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks.names),
                task_manager=tasks.manager,
                limit=limit,
                num_fewshot=num_fewshot,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=False,
            )
    except OSError as error:  # ConnectionError, a missing data file: loading a task's dataset failed
        raise InvalidInputError(
            f"cannot load the data of lm-eval task(s) {', '.join(tasks.names)}: {first_line(error)} "
            "(lm-eval's own tasks download their datasets from the Hugging Face Hub once; a task YAML with local "
            "data_files needs no network)"
        ) from error
    return _scores(results)


def _scores(results: dict) -> dict[str, dict[str, float | int]]:
    """lm-eval's `results` (`"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...`) as the module describes."""
    scores = {}
    for task, entry in results["results"].items():
        metrics: dict[str, float | int] = {}
        for key, value in entry.items():
            name, comma, filter_name = key.partition(",")
            if not comma or not isinstance(value, (int, float)):  # "alias", "sample_len"; "N/A" standard errors
                continue
            metric = name.removesuffix("_stderr")
            label = metric if filter_name == "none" else f"{metric},{filter_name}"
            metrics[label + ("_stderr" if name != metric else "")] = float(value)
        if task in results.get("n-samples", {}):
            metrics["samples"] = int(results["n-samples"][task]["effective"])
        if task in results.get("n-shot", {}):
            metrics["num_fewshot"] = int(results["n-shot"][task])
        scores[task] = metrics
    return scores
