"""The report of `paper_table.py`: markdown tables (the paper's Tables 1-3 in miniature), a JSON of every run, and
a figure of task score against general ability kept. Every sentence of findings is computed from the runs.

`python benchmarks/paper_report.py OUT/paper_table.json` writes a report again from its JSON (after this file
changes) without training anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METHOD_ORDER = ("esft-token", "esft-gate", "full", "lora")
_TRAINED_TOO = {"shared_experts": "shared experts", "non_expert_modules": "non-expert modules"}
GENERAL_LOSS = "general"  # the built-in task scored by loss: reported apart (lower is better)


def write_report(results: list[dict], chosen: dict, scale: dict, out: Path) -> Path:
    scale = scale | _task_kinds()
    runs = list({run["name"]: run for run in results}.values())
    failed = [run for run in runs if "error" in run]
    runs = [run for run in runs if "error" not in run]
    base = next(run for run in runs if run["kind"] == "base")
    main = [run for run in runs if run["kind"] == "main" and run["lr"] == chosen[run["method"]]]
    for run in [*main, *(r for r in runs if r["kind"] in ("top_p", "modules"))]:
        run.update(_abilities(run, base, scale))
    modules = [run for run in runs if run["kind"] == "modules"]
    findings = (
        _findings(main) + _module_findings(modules, main) + [f"Failed: {run['name']}: {run['error']}" for run in failed]
    )
    name = "paper_table" if scale["name"] == "full" else f"paper_table_{scale['name']}"
    out.mkdir(parents=True, exist_ok=True)
    every_run = {"chosen_lr": chosen, "scale": scale, "runs": runs + failed}
    (out / f"{name}.json").write_text(json.dumps(every_run, indent=1))
    _figure(main, out / f"{name}.png")
    sections = [
        f"# ESFT vs full fine-tuning vs LoRA on the demo base{' (quick smoke run)' if scale['name'] == 'quick' else ''}\n",
        _setup(scale, chosen, name),
        "## Findings\n\n" + "\n".join(f"- {line}" for line in findings),
        "## Summary over the held-out tasks (mean ± standard deviation over tasks and seeds)\n\n" + _summary(main),
        "## Per task\n\n" + _per_task(main, base, scale),
        f"## Learning-rate sweep (validation loss: the held-out share of the {scale['sweep_task']} training data)\n\n"
        + _sweep(runs + failed, chosen, scale["sweep_task"]),
        "## Ablation: p\n\n" + _top_p(runs),
        "## Ablation: shared experts and non-expert modules\n\n" + _modules(runs, main),
    ]
    report = out / f"{name}.md"
    report.write_text("\n\n".join(sections) + "\n")
    return report


def _task_kinds() -> dict[str, list[str]]:
    """The built-in tasks general ability is measured on (the demo base's pretraining tasks, scored by a metric), and
    the held-out ones: the base scores about 0 on those, so averaged in they would only dilute every change."""
    from expert_hub.tasks import BUILTIN_TASKS

    tasks = BUILTIN_TASKS.values()
    return {
        "general_tasks": [task.name for task in tasks if task.in_demo_base and task.metric != "loss"],
        "held_out_tasks": [task.name for task in tasks if not task.in_demo_base],
    }


def _abilities(run: dict, base: dict, scale: dict) -> dict:
    """The run's task score; general ability (the mean score on the tasks the base was pretrained on) and, apart,
    the mean on the other held-out tasks; each with its change from the base."""
    scores = run["scores"]
    task_key = f"{run['task']}@{scale['task_records']}"
    general = [f"{name}@{scale['other_records']}" for name in scale["general_tasks"]]
    held_out = [f"{name}@{scale['other_records']}" for name in scale["held_out_tasks"] if name != run["task"]]
    general_loss_key = f"{GENERAL_LOSS}@{scale['other_records']}"
    return {
        "task_score": scores[task_key],
        "task_gain": scores[task_key] - base["scores"][task_key],
        "general": _mean(scores, general),
        "general_change": _mean(scores, general) - _mean(base["scores"], general),
        "held_out_change": _mean(scores, held_out) - _mean(base["scores"], held_out),
        "general_loss_change": scores[general_loss_key] - base["scores"][general_loss_key],
    }


def _mean(scores: dict[str, float], keys: list[str]) -> float:
    return statistics.mean(scores[key] for key in keys)


def _mean_spread(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def _groups(runs: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for run in runs:
        groups[tuple(run[key] for key in keys)].append(run)
    return dict(sorted(groups.items(), key=lambda item: tuple(_order(value) for value in item[0])))


def _order(value):
    return (METHOD_ORDER.index(value), "") if value in METHOD_ORDER else (len(METHOD_ORDER), str(value))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _setup(scale: dict, chosen: dict, name: str) -> str:
    from expert_hub.demo import demo_base
    from expert_hub.models import load_config
    from expert_hub.training import base_training_defaults

    base = load_config(demo_base())
    rates = ", ".join(f"{method} {lr:g}" for method, lr in chosen.items())
    top_p = ", ".join(f"{method} {p:g}" for method, p in scale["main_top_p"].items())
    seq_len = base_training_defaults(demo_base())["seq_len"]
    return (
        f"Demo base (DeepSeek-V2-shaped: {base.num_hidden_layers} layers, {base.n_routed_experts} routed experts, "
        f"top-{base.num_experts_per_tok}, {base.n_shared_experts} shared experts); held-out tasks "
        f"{', '.join(scale['tasks'])}; {scale['steps']} steps of {scale['batch_size']} x {seq_len} tokens per run; "
        f"p: {top_p}; seeds "
        f"{', '.join(map(str, scale['seeds']))} (mean ± standard deviation over them). Task score: the task's metric on "
        f"the first {scale['task_records']} eval records (translation: BLEU / 100). General ability: the mean score on "
        f"the first {scale['other_records']} eval records of each task the base was pretrained on "
        f"({', '.join(scale['general_tasks'])}); apart, the other held-out tasks' mean (Δ held-out; the base scores "
        f"about 0 there) and the loss on the built-in `general` text (Δ general loss). Mixing: the built-in `general` conversations, 1:1. Learning rates (the sweep's best): "
        f"{rates}. Training time is the whole `train` call (loading and ESFT's scoring included), one CPU "
        f"thread; peak memory is the run's process when training ended (before scoring). {scale['minutes']} minutes in all. Produced by `benchmarks/paper_table.py`; every run in "
        f"`{name}.json`.\n\n![Task score against general ability kept]({name}.png)"
    )


_FIGURES = ["task score", "general", "Δ general", "Δ held-out", "Δ general loss", "trainable params", "train s"]
_FIGURES += ["peak MiB", "artifact MiB"]


def _figures(runs: list[dict]) -> list[str]:
    """The table cells of a group of runs (the seeds of one configuration, or every task's)."""
    return [
        _mean_spread([r["task_score"] for r in runs]),
        _mean_spread([r["general"] for r in runs]),
        f"{statistics.mean(r['general_change'] for r in runs):+.3f}",
        f"{statistics.mean(r['held_out_change'] for r in runs):+.3f}",
        f"{statistics.mean(r['general_loss_change'] for r in runs):+.3f}",
        f"{statistics.mean(r['trainable_parameters'] for r in runs):,.0f}",
        f"{statistics.mean(r['train_seconds'] for r in runs):.0f}",
        f"{max(r['peak_rss_bytes'] for r in runs) / 2**20:.0f}",
        f"{statistics.mean(r['artifact_bytes'] for r in runs) / 2**20:.2f}",
    ]


def _summary(main: list[dict]) -> str:
    groups = _groups(main, "method", "mix")
    rows = [[method, "yes" if mix else "no", *_figures(runs)] for (method, mix), runs in groups.items()]
    return _table(["method", "mixed", *_FIGURES], rows)


def _per_task(main: list[dict], base: dict, scale: dict) -> str:
    groups = _groups(main, "task", "method", "mix")
    rows = [[task, method, "yes" if mix else "no", *_figures(runs)] for (task, method, mix), runs in groups.items()]
    records = scale["task_records"]
    base_scores = ", ".join(f"{task} {base['scores'][f'{task}@{records}']:.3f}" for task in scale["tasks"])
    header = ["task", "method", "mixed", *_FIGURES]
    return f"The base model's task scores: {base_scores}.\n\n" + _table(header, rows)


def _sweep(runs: list[dict], chosen: dict, task: str) -> str:
    sweep = [r for r in runs if r["kind"] == "main" and r["task"] == task and r["seed"] == 0 and not r["mix"]]
    rates = sorted({r["lr"] for r in sweep})
    rows = []
    for (method,), group in _groups(sweep, "method").items():
        losses = {r["lr"]: "diverged" if "error" in r else f"{r['eval_loss']:.4f}" for r in group}
        cells = [f"**{losses[lr]}**" if lr == chosen[method] else losses.get(lr, "-") for lr in rates]
        rows.append([method, *cells])
    return _table(["method", *(f"lr {lr:g}" for lr in rates)], rows)


def _top_p(runs: list[dict]) -> str:
    rows = [
        [
            r["method"],
            f"{r['settings']['top_p']:g}",
            f"{r['trainable_parameters']:,}",
            f"{r['task_score']:.3f}",
            f"{r['general']:.3f}",
            f"{r['general_change']:+.3f}",
            f"{r['artifact_bytes'] / 2**20:.2f}",
        ]
        for (_, _), group in _groups([r for r in runs if r["kind"] == "top_p"], "method", "variant").items()
        for r in group
    ]
    return _table(["method", "p", "trainable params", "task score", "general", "Δ general", "artifact MiB"], rows)


def _modules(runs: list[dict], main: list[dict]) -> str:
    """Per task: ESFT-Token's selection alone, with shared experts, with non-expert modules, and full fine-tuning."""
    modules = [r for r in runs if r["kind"] == "modules"]
    if not modules:
        return "(not run)"
    rows = []
    for (task,), group in _groups(modules, "task").items():
        labelled = [("routed experts only (esft-token)", _seed0(main, task, "esft-token"))]
        labelled += [(f"+ {_TRAINED_TOO[r['variant']]}", r) for r in group]
        labelled += [("everything (full)", _seed0(main, task, "full"))]
        rows += [
            [
                task,
                label,
                f"{r['trainable_parameters']:,}",
                f"{r['task_score']:.3f}",
                f"{r['general']:.3f}",
                f"{r['general_change']:+.3f}",
                f"{r['artifact_bytes'] / 2**20:.2f}",
            ]
            for label, r in labelled
        ]
    header = ["task", "trained", "trainable params", "task score", "general", "Δ general", "artifact MiB"]
    return "Seed 0, no mixing, each at ESFT-Token's learning rate (full: its own).\n\n" + _table(header, rows)


def _seed0(main: list[dict], task: str, method: str) -> dict:
    return next(r for r in main if r["method"] == method and r["task"] == task and r["seed"] == 0 and not r["mix"])


def _findings(main: list[dict]) -> list[str]:
    """The paper's claims, each checked against the runs."""
    by_method = {method: runs for (method,), runs in _groups([r for r in main if not r["mix"]], "method").items()}
    mean = {
        m: {
            k: statistics.mean(r[k] for r in runs)
            for k in (
                "task_score",
                "general_change",
                "held_out_change",
                "train_seconds",
                "artifact_bytes",
                "trainable_parameters",
            )
        }
        for m, runs in by_method.items()
    }
    lines = []
    best_esft = max(("esft-token", "esft-gate"), key=lambda m: mean[m]["task_score"])
    lines.append(
        "Task performance (no mixing): "
        + ", ".join(f"{m} {v['task_score']:.3f}" for m, v in mean.items())
        + f"; the better ESFT ({best_esft}) is "
        f"{mean[best_esft]['task_score'] - mean['full']['task_score']:+.3f} from full fine-tuning."
    )
    kept = sorted(mean, key=lambda m: mean[m]["general_change"], reverse=True)
    lines.append(
        "General ability kept (change from the base, no mixing): "
        + ", ".join(f"{m} {mean[m]['general_change']:+.3f}" for m in kept)
        + (
            "; ESFT keeps more than full fine-tuning and LoRA, as in the paper."
            if min(mean["esft-token"]["general_change"], mean["esft-gate"]["general_change"])
            > max(mean["full"]["general_change"], mean["lora"]["general_change"])
            else "; ESFT does not keep more than both baselines here, unlike the paper."
        )
    )
    lines.append(
        "The other held-out tasks (change from the base, no mixing): "
        + ", ".join(f"{m} {mean[m]['held_out_change']:+.3f}" for m in kept)
        + "."
    )
    mixed = {m: statistics.mean(r["general_change"] for r in main if r["mix"] and r["method"] == m) for m in by_method}
    lines.append("With general data mixed in: " + ", ".join(f"{m} {v:+.3f}" for m, v in mixed.items()) + ".")
    for m in ("esft-token", "esft-gate"):
        lines.append(
            f"{m}: {mean[m]['trainable_parameters'] / mean['full']['trainable_parameters']:.1%} of full fine-tuning's "
            f"trainable parameters, {mean[m]['train_seconds'] / mean['full']['train_seconds']:.2f}x its training time, "
            f"{mean[m]['artifact_bytes'] / mean['full']['artifact_bytes']:.1%} of its artifact bytes."
        )
    return lines


def _module_findings(modules: list[dict], main: list[dict]) -> list[str]:
    """Per task, ESFT's gap to full fine-tuning, and how much of it training what ESFT freezes closes."""
    lines = []
    for (task,), group in _groups(modules, "task").items():
        esft, full = _seed0(main, task, "esft-token"), _seed0(main, task, "full")
        variants = ", ".join(f"+ {_TRAINED_TOO[r['variant']]} {r['task_score']:.3f}" for r in group)
        lines.append(
            f"{task} (seed 0): esft-token {esft['task_score']:.3f}, full {full['task_score']:.3f}; "
            f"the same experts {variants}."
        )
    return lines


def _figure(main: list[dict], path: Path) -> None:
    """Each method's task score against its change in general ability (mean over tasks and seeds)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for (method, mix), runs in _groups(main, "method", "mix").items():
        x = statistics.mean(r["general_change"] for r in runs)
        y = statistics.mean(r["task_score"] for r in runs)
        axes.scatter(
            x,
            y,
            marker="s" if mix else "o",
            color=f"C{METHOD_ORDER.index(method)}",
            label=f"{method}{' + mixing' if mix else ''}",
        )
    axes.axvline(0, color="grey", linewidth=0.8)
    axes.set_xlabel("change in general ability (mean score on the pretrained tasks, vs the base)")
    axes.set_ylabel("task score")
    axes.set_title("Task score vs general ability kept (demo base)")
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a paper_table report again from its JSON.")
    parser.add_argument("every_run", type=Path, help="OUT/paper_table.json (or _long, _quick)")
    path = parser.parse_args().every_run
    every_run = json.loads(path.read_text())
    print(f"wrote {write_report(every_run['runs'], every_run['chosen_lr'], every_run['scale'], path.parent)}")


if __name__ == "__main__":
    main()
