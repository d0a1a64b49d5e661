"""`quickstart`: the whole product on the demo base in a few minutes, offline.

Train two held-out built-in tasks with ESFT-Token, register them, serve both on vLLM beside the base model, ask
each one question through the OpenAI client, and show what changed: the experts each task chose, its eval score
before and after, and the answers next to the references.

It reruns with any of its options: each task's run lives in a directory of its own settings, so a rerun with the
same ones reuses the finished run (and the registry the version it holds), and one with others trains apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import httpx2
import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from expert_hub.demo import demo_base
from expert_hub.errors import InvalidInputError
from expert_hub.training import TrainingConfig, base_training_defaults

from .app import app, console, status_console
from .training import run_with_progress

SERVER_START_SECONDS = 300
DEMO_STEPS: int = base_training_defaults(demo_base()).get("steps", TrainingConfig.steps)  # else the general default


@app.command()
def quickstart(
    tasks: Annotated[
        str, typer.Option(help="Comma-separated built-in tasks to teach the demo base (held-out ones are new to it).")
    ] = "law,translation",
    out: Annotated[
        Path, typer.Option(help="Where the runs and the server log go; a rerun reuses the runs it finished.")
    ] = Path("runs/quickstart"),
    eval_records: Annotated[
        int, typer.Option(min=1, help="Eval records per task, scored before and after training.")
    ] = 60,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port for the demo server (127.0.0.1).")] = 8123,
    steps: Annotated[int, typer.Option(min=1, help="Training steps per task (the demo base's default).")] = DEMO_STEPS,
) -> None:
    """Train two tasks' experts on the demo base, serve them, query them, and show the before / after."""
    from expert_hub.models import base_metadata
    from expert_hub.registry import Registry
    from expert_hub.tasks import BUILTIN_TASKS

    names = list(dict.fromkeys(name.strip() for name in tasks.split(",") if name.strip()))
    unknown = [name for name in names if name not in BUILTIN_TASKS or name == "general"]
    if unknown or not names:
        raise InvalidInputError(
            f"--tasks takes built-in tasks ({', '.join(t for t in BUILTIN_TASKS if t != 'general')})"
        )
    base, registry, started = demo_base(), Registry(), time.monotonic()
    metadata = base_metadata(base)
    recipe = metadata.get("recipe", {})
    console.print(
        Panel(
            f"Demo base: {base}\nDeepSeek-V2-style MoE pretrained from scratch on {', '.join(recipe.get('data_mix', []))} "
            f"({recipe.get('steps', '?')} steps, {metadata.get('seconds', 0) / 60:.0f} min on "
            f"{metadata.get('machine', {}).get('cpu_threads', '?')} CPU threads); tasks it never saw: "
            f"{', '.join(recipe.get('held_out', []))}.",
            title="expert-hub quickstart",
            expand=False,
        )
    )

    results = {name: _teach(name, base, out, eval_records, registry, steps) for name in names}
    _print_results(results, base)
    answers = _ask_server(names, base, out, port, registry)
    _print_answers(answers)
    console.print(
        Panel(
            f"registry:  {registry.root}  (`expert-hub list`)\n"
            + "".join(f"adapter:   {results[name]['artifact']}\n" for name in names)
            + f"runs/logs: {out}  (training log: log.jsonl beside each adapter; server: {out}/server.log)\n"
            f"next:      expert-hub serve --tasks {','.join(names)}   |   expert-hub train --task {_another_task(names)}\n"
            f"took {(time.monotonic() - started) / 60:.1f} min",
            title="where things are",
            expand=False,
        )
    )


def _another_task(taught: list[str]) -> str:
    """A held-out task the quickstart did not teach, to suggest next."""
    from expert_hub.tasks import BUILTIN_TASKS

    untaught = [name for name, task in BUILTIN_TASKS.items() if not task.in_demo_base and name not in taught]
    return (untaught or ["math"])[0]


def _teach(name: str, base: str, out: Path, eval_records: int, registry, steps: int) -> dict:
    """Score the base on the task, train the task's experts (unless a run with these settings finished), register
    them, score again."""
    from expert_hub.adapter import ExpertAdapter
    from expert_hub.evaluation import evaluate_records
    from expert_hub.models import load_base, load_tokenizer
    from expert_hub.tasks import builtin_task, export
    from expert_hub.training import get_method

    task, tokenizer = builtin_task(name), load_tokenizer(base)
    records = task.eval_records(eval_records)

    def score(model) -> float:
        with status_console.status(f"Evaluating {name} on {len(records)} held-out records"):
            return evaluate_records(
                model, tokenizer, records, task.metric, max_new_tokens=task.max_new_tokens, batch_size=20
            )["value"]

    base_model = load_base(base)
    before = score(base_model)
    # the data under `out`, not under the registry: a rerun with another registry asks for the same run
    data = str(export(name, out / "data" / name)["train"])
    config = _in_own_directory(
        TrainingConfig(task=name, base=base, data=data, out="", **base_training_defaults(base) | {"steps": steps}), out
    )
    artifact = Path(config.out) / get_method(config.method).artifact_name
    if artifact.is_dir():  # written whole once the run's last step is done: these settings' finished run
        console.print(f"Reusing {artifact}, trained earlier with these settings")
    else:
        artifact = run_with_progress(config).artifact
    entry = registry.register(artifact, task=name, base=base)
    adapter = ExpertAdapter.load(artifact)
    total = sum(p.numel() for p in base_model.parameters())
    after = score(adapter.apply(base_model))  # the base already in memory, with the task's experts copied in
    return {
        "metric": task.metric,
        "before": before,
        "after": after,
        "ref": entry.ref,
        "artifact": artifact,
        "experts": adapter.selection.experts,
        "seconds": adapter.metadata.training.get("seconds", 0.0),
        "share": sum(t.numel() for t in adapter.tensors.values()) / total,
    }


def _in_own_directory(config: TrainingConfig, out: Path) -> TrainingConfig:
    """`config` with its run in `out`, in a directory named by a hash of every other setting: a rerun with other
    options (`--steps`, the package installed elsewhere) trains apart instead of being refused by another run's
    directory, and one with the same options finds its own run."""
    settings = {key: value for key, value in config.to_json().items() if key != "out"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return replace(config, out=str(out / f"{config.task}-{digest[:8]}"))


def _print_results(results: dict, base: str) -> None:
    table = Table(title="ESFT on the demo base (eval on held-out records)")
    for column in ("task", "metric", "before", "after", "experts per MoE layer", "share of the model", "trained"):
        table.add_column(column, justify="left" if column in ("task", "metric", "experts per MoE layer") else "right")
    for name, r in results.items():
        experts = "  ".join(f"L{layer}:{len(ids)}" for layer, ids in sorted(r["experts"].items()))
        table.add_row(
            name,
            r["metric"],
            f"{r['before']:.3f}",
            Text(f"{r['after']:.3f}", style="bold"),
            experts,
            f"{r['share']:.1%}",
            f"{r['seconds']:.0f} s",
        )
    console.print(table)


def _ask_server(names: list[str], base: str, out: Path, port: int, registry) -> list[dict]:
    """Start `expert-hub serve` with the tasks, ask one question per task and one to the base, always stop it."""
    from openai import OpenAI

    from expert_hub.data import reference_segments
    from expert_hub.tasks import builtin_task

    log_path = out / "server.log"
    if _answers_health(port):
        raise InvalidInputError(f"port {port} is taken by another server; stop it or pass --port")
    command = [
        sys.executable,
        "-m",
        "expert_hub.cli",
        "serve",
        "--tasks",
        ",".join(names),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
    ]
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | {"EXPERT_HUB_HOME": str(registry.root)},
        )
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _wait_for(server, port, log_path)
        client = OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", http_client=httpx2.Client(trust_env=False)
        )  # a proxy setting must not reroute 127.0.0.1
        answers = []
        for model, name in [(name, name) for name in names] + [(base, names[0])]:
            question, reference = builtin_task(name).examples("eval", 1)[0]
            prompt = "".join(text for text, _ in reference_segments([question]))
            completion = client.completions.create(
                model=model, prompt=prompt, temperature=0, max_tokens=builtin_task(name).max_new_tokens
            )
            answers.append(
                {
                    "model": "base" if model == base else model,
                    "question": question["content"],
                    "answer": completion.choices[0].text.strip(),
                    "reference": reference["content"],
                }
            )
        return answers
    finally:
        _stop(server)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _answers_health(port: int) -> bool:
    """Whether something on 127.0.0.1:`port` answers /health (never through a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_for(server: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    with status_console.status(f"Starting `expert-hub serve` on port {port} (log: {log_path})"):
        while time.monotonic() < deadline:
            if server.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise InvalidInputError(f"the demo server exited: {tail[0]} (log: {log_path})")
            if _answers_health(port):
                return
            time.sleep(1)
    raise InvalidInputError(f"the demo server did not answer within {SERVER_START_SECONDS} s (log: {log_path})")


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`, which stops the server


def _stop(server: subprocess.Popen) -> None:
    """Stop the server and every process it started (vLLM runs its engine in a child process).

    The whole process group is signalled even when the server itself has exited, so no engine outlives it;
    a second Ctrl-C while waiting goes straight to SIGKILL.
    """
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def _print_answers(answers: list[dict]) -> None:
    table = Table(title="One request per model through the OpenAI client (temperature 0)")
    for column in ("model", "question", "answer", "reference"):
        table.add_column(column, overflow="fold")
    for answer in answers:
        table.add_row(answer["model"], answer["question"], answer["answer"], answer["reference"])
    console.print(table)
