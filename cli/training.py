"""Training commands: `train` a task's experts (or a baseline), `eval` a model with or without an adapter."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from expert_hub.demo import base_metadata, demo_base
from expert_hub.evaluation import METRICS
from expert_hub.training.config import ESFT_METHODS, METHODS

from .app import DType, app, base_or_demo, base_training_defaults, console, data_or_builtin, progress_bar, status_console

_DEMO_DEFAULTS = base_metadata(demo_base()).get("training_defaults", {})


def _demo(setting: str) -> str:
    """The demo base's own default for `setting`, as it ships it, for --help."""
    value = _DEMO_DEFAULTS.get(setting, "-")
    return f"{value:g}" if isinstance(value, float) else str(value)


Method = Enum("Method", {name.replace("-", "_"): name for name in METHODS}, type=str)
Metric = Enum("Metric", {name: name for name in METRICS}, type=str)


@app.command()
def train(
    task: Annotated[str, typer.Option(help="Task name, e.g. law; names the output and the adapter. A built-in task (`expert-hub tasks`) brings its own data.")],
    base: Annotated[Optional[str], typer.Option(help="Base MoE model: a local directory or a Hub id [default: the demo base shipped in the package].")] = None,
    data: Annotated[Optional[str], typer.Option(help="Training data: JSONL of {\"messages\": [...]} lines, or a Hugging Face dataset (saved directory or name) [default: the built-in task's train split].")] = None,
    method: Annotated[Method, typer.Option(help="esft-token / esft-gate (score, select, train), esft (with --experts), or the baselines full / lora.")] = Method.esft_token,
    experts: Annotated[Optional[Path], typer.Option(help="expert_cfg.json for --method esft.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default runs/TASK-METHOD); rerunning on it resumes.")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help=f"Optimizer steps [default: 500; the demo base: {_demo('steps')}].")] = None,
    split: Annotated[str, typer.Option(help="Split of a Hugging Face dataset.")] = "train",
    chat_template: Annotated[bool, typer.Option("--chat-template", help="Use the tokenizer's chat template instead of the reference `User: …\\n\\nAssistant:` format.")] = False,
    score_tokens: Annotated[Optional[int], typer.Option(min=1, help=f"Task tokens scored to select experts (esft-token / esft-gate) [default: 131072; the demo base: {_demo('score_tokens')}].")] = None,
    top_p: Annotated[Optional[float], typer.Option(help=f"Selection threshold [default: 0.2 (token) / 0.1 (gate); the demo base: {_demo('top_p')}].")] = None,
    lora_rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(min=1, help="LoRA alpha.")] = 16,
    lora_targets: Annotated[str, typer.Option(help="Comma-separated LoRA target modules ('all-linear': the attention projections and other linear layers, not lm_head, the routers, the routed experts or MLP projections that PEFT would redirect to the routed experts).")] = "all-linear",
    lora_experts: Annotated[bool, typer.Option(help="Also put LoRA on the fused routed-expert tensors (gate_up_proj, down_proj); routers never get LoRA.")] = True,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help=f"Packed sequences per micro-batch [default: 1; the demo base: {_demo('batch_size')}].")] = None,
    grad_accumulation: Annotated[Optional[int], typer.Option(min=1, help=f"Micro-batches per optimizer step [default: 16; the demo base: {_demo('grad_accumulation')}].")] = None,
    seq_len: Annotated[Optional[int], typer.Option(min=8, help=f"Packed sequence length [default: 4096; the demo base: {_demo('seq_len')}].")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Learning rate [default: 1e-5 (ESFT, full), 1e-4 (LoRA); the demo base: {_demo('learning_rate')}].")] = None,
    beta1: Annotated[float, typer.Option(help="AdamW beta1.")] = 0.9,
    beta2: Annotated[float, typer.Option(help="AdamW beta2.")] = 0.95,
    weight_decay: Annotated[float, typer.Option(min=0, help="AdamW weight decay.")] = 0.1,
    clip_grad_norm: Annotated[float, typer.Option(help="Gradient-norm clip (above 0).")] = 1.0,
    random_concat_ratio: Annotated[float, typer.Option(min=0, max=1, help="Chance a packed example drops its BOS (reference packing).")] = 0.2,
    eval_fraction: Annotated[float, typer.Option(min=0, max=0.99, help="Share of packed sequences held out for eval loss.")] = 0.02,
    dtype: Annotated[DType, typer.Option(help="Weights dtype; auto = bfloat16 on GPUs that support it, else float32 (ESFT keeps the trained rows in float32).")] = DType.auto,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward to save memory [default: on; the demo base: off].")] = None,
    seed: Annotated[int, typer.Option(help="Seed for packing, data order and initialisation.")] = 5934875,
    save_every: Annotated[Optional[int], typer.Option(min=1, help=f"Checkpoint every N steps [default: 100; the demo base: {_demo('save_every')}].")] = None,
    eval_every: Annotated[Optional[int], typer.Option(min=1, help=f"Eval loss every N steps [default: 100; the demo base: {_demo('eval_every')}].")] = None,
    keep_checkpoints: Annotated[int, typer.Option(min=1, help="Checkpoints kept.")] = 2,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the model repo's own code (only if you trust it).")] = False,
    register: Annotated[bool, typer.Option(help="Add the trained experts to the local registry (ESFT methods).")] = True,
) -> None:
    """Train a task's experts with ESFT (or a full / LoRA baseline); resumable, with checkpoints.

    With no --base and --data, `expert-hub train --task law` trains the demo base on the built-in law data with
    ESFT-Token in a few minutes on 2 CPU cores: a base may ship its own training defaults (the demo base does),
    and every option given here overrides them.
    """
    from expert_hub.training import TrainingConfig

    from expert_hub.registry import Registry, validate_task_name
    from expert_hub.registry.store import normalize_base

    validate_task_name(task)  # it names the output directory and the registry entry
    if register and method.value in ESFT_METHODS:
        Registry().check_writable()
    base = normalize_base(base_or_demo(base))  # absolute: the artifacts find a local base from anywhere
    data = data_or_builtin(data, task, "train")
    given = dict(steps=steps, score_tokens=score_tokens, top_p=top_p, batch_size=batch_size,
                 grad_accumulation=grad_accumulation, seq_len=seq_len, learning_rate=lr,
                 gradient_checkpointing=gradient_checkpointing, save_every=save_every, eval_every=eval_every)
    config = TrainingConfig(
        **base_training_defaults(base) | {key: value for key, value in given.items() if value is not None},
        task=task, base=base, data=data, out=str(out or Path("runs") / f"{task}-{method.value}"), method=method.value,
        experts=str(experts) if experts else None, split=split, chat_template=chat_template,
        lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()], lora_experts=lora_experts,
        betas=(beta1, beta2), weight_decay=weight_decay, clip_grad_norm=clip_grad_norm,
        random_concat_ratio=random_concat_ratio, eval_fraction=eval_fraction, dtype=dtype.value, seed=seed,
        keep_checkpoints=keep_checkpoints, trust_remote_code=trust_remote_code,
    )
    result = run_with_progress(config)
    if result is None:
        return
    if register and config.method in ESFT_METHODS:
        entry = Registry().register(result.artifact, task=task, base=base)
        console.print(f"Registered {entry.ref} ({entry.digest[:12]}); use it as `--adapter {task}` or in `serve`")


def run_with_progress(config):
    """Run training with a rich progress bar; returns the result on the main process, None on the others."""
    from expert_hub.training import train as run_training

    task, method, steps = config.task, config.method, config.steps
    progress = Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("eval {task.fields[eval_loss]}"),
        TextColumn("{task.fields[tokens_per_second]} tok/s"), TimeRemainingColumn(), console=status_console,
    )
    bar = progress.add_task(f"Training {task} ({method})", total=steps, loss="-", eval_loss="-",
                            tokens_per_second="-")

    def on_status(message: str) -> None:  # the bar appears with the first news: bad input fails without one
        progress.start()
        progress.console.print(message)

    def on_step(report) -> None:
        progress.update(bar, completed=report.step, loss=f"{report.loss:.4f}",
                        eval_loss="-" if report.eval_loss is None else f"{report.eval_loss:.4f}",
                        tokens_per_second=f"{report.tokens_per_second:,.0f}")

    try:
        result = run_training(config, on_step=on_step, on_status=on_status)
        progress.update(bar, completed=steps)
    finally:
        if progress.live.is_started:
            progress.stop()
    if not result.main_process:
        return None
    losses = ", ".join(f"{name} {value:.4f}" for name, value in (("train loss", result.train_loss),
                                                              ("eval loss", result.eval_loss)) if value is not None)
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    console.print(f"Trained {result.steps} steps in {result.seconds:.1f}s{resumed}; {losses} -> {result.artifact}")
    return result


@app.command(name="eval")
def evaluate(
    base: Annotated[Optional[str], typer.Option(help="Base model (a directory or Hub id), or a full fine-tuned checkpoint [default: the demo base].")] = None,
    data: Annotated[Optional[str], typer.Option(help="Eval data: the reference eval JSONL (prompt / raw_answers), conversations, or a Hugging Face dataset [default: the built-in task's eval split].")] = None,
    task: Annotated[Optional[str], typer.Option(help="A built-in task: its eval split, metric and answer length are the defaults [default: --adapter's name when it is one].")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="An expert adapter or a PEFT (LoRA) adapter directory, or a registered task (law, law@2).")] = None,
    metric: Annotated[Optional[Metric], typer.Option(help="loss (and perplexity), exact match, intent (JSON intent + slots) or bleu [default: the built-in task's, else loss].")] = None,
    split: Annotated[str, typer.Option(help="Split of a Hugging Face dataset.")] = "test",
    chat_template: Annotated[bool, typer.Option("--chat-template", help="Render conversations with the tokenizer's chat template.")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option(min=1, help="Longest generated answer [default: 128, or the built-in task's].")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Records per forward / generate call.")] = 8,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate only the first N records.")] = None,
    dtype: Annotated[DType, typer.Option(help="Weights dtype.")] = DType.auto,
    device: Annotated[Optional[str], typer.Option(help="torch device (default: cuda when available).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Apply an expert adapter even if the base fingerprint differs.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the model repo's own code (only if you trust it).")] = False,
) -> None:
    """Evaluate a base model, optionally with an adapter, on task data (or a built-in task's eval split)."""
    from expert_hub.adapter import load_model
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
        model = load_model(base, adapter, force=force, dtype=dtype.value, trust_remote_code=trust_remote_code).to(device)
        tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
    with progress_bar("records") as progress:
        bar = progress.add_task(f"Evaluating ({metric.value})", total=None)
        result = run_evaluation(model, tokenizer, data, metric.value, split=split, chat_template=chat_template,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit,
                                on_records=lambda done, total: progress.update(bar, advance=done, total=total))
    result |= {"base": base, "adapter": str(adapter) if adapter else None, "data": data}
    if as_json:
        console.print_json(data=result)
        return
    table = Table(show_header=False)
    for key in ("value", "perplexity", "tokens", "count", "base", "adapter", "data"):
        if result.get(key) is not None:
            value = result[key]
            table.add_row(metric.value if key == "value" else key,
                          f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
