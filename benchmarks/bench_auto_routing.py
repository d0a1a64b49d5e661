"""Auto routing on the demo base: does a prompt's routing pick its task, and what does choosing cost?

In one run, on the demo base with its built-in tasks:
1. trains ESFT-Token experts for each of the six tasks (math, code, summary, law, intent, translation); training
   ships each task's routing profile (its training prompts' routing) in the adapter;
2. routes held-out eval prompts of those tasks, and of `general` (no adapter: they should run on the base), with
   `TaskRouter`: accuracy per task and the confusion matrix at the default depth, accuracy against the routing depth
   and against the prompt's length (its first N tokens), and the routing time per prompt; and the accuracy of each
   form a client sends a prompt in (bare question text, text in the training format, chat messages), routed as the
   server routes each;
3. the same held-out prompts with a simple text classifier for reference, TF-IDF + logistic regression trained on the
   same training prompts (it has no "none of these" answer, so it is scored on the six tasks only);
4. the end-task score of each task's eval records generated with the task named, with auto routing, and with the
   base model;
5. serving: `expert-hub serve` with the six tasks, the same mixed completions sent with each task named and as
   `"model": "auto"`, interleaved rounds -> output tokens/s and the ratio (goal: auto costs <= 5%); then every
   held-out prompt sent as `"model": "auto"` in each client form (bare and training-format text to
   `/v1/completions`, messages to `/v1/chat/completions`): how often the server chose its task.
Goals (issues 16, 29): >= 95% routing accuracy on prompts of >= 32 tokens and on each client form, end-task scores
within 2% of naming the task.
Run: `.venv/bin/python benchmarks/bench_auto_routing.py [--steps N] [--eval-prompts 60] [--skip-serving]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from bench_registry import _timed
from bench_serving import _request
from lora_peer import wait_for_health
from rich.console import Console
from rich.table import Table

TASKS = ("math", "code", "summary", "law", "intent", "translation")
OUTSIDE = "general"  # no adapter: its prompts should run on the base model
LENGTHS = (8, 16, 32, 64)
RESULTS = Path(__file__).resolve().parent / "results"


def _train(base: str, root: Path, steps: int | None, console: Console) -> dict[str, Path]:
    from expert_hub.tasks import export
    from expert_hub.training import TrainingConfig, base_training_defaults, train

    artifacts = {}
    for task in TASKS:
        started = time.perf_counter()
        defaults = base_training_defaults(base) | ({"steps": steps} if steps else {})
        data = export(task, root / "data" / task)["train"]
        config = TrainingConfig(task=task, base=base, data=str(data), out=str(root / task), **defaults)
        artifacts[task] = train(config).artifact
        console.print(f"trained {task} in {time.perf_counter() - started:.0f} s")
    return artifacts


def client_forms(messages: list[dict]) -> dict[str, tuple[str, object]]:
    """A held-out conversation's prompt as clients send it: form -> (endpoint, prompt or messages)."""
    from expert_hub.data import reference_segments

    turns = messages[:-1]
    return {
        "bare": ("/v1/completions", turns[-1]["content"]),
        "training format": ("/v1/completions", "".join(text for text, _ in reference_segments(turns))),
        "chat": ("/v1/chat/completions", turns),
    }


def _form_accuracy(router, profiles: dict, tokenizer, conversations: dict[str, list], expected: dict) -> dict:
    """Per client form, the share of held-out prompts routed right, each form brought into routing as the server
    brings it (`expert_hub.serving.auto`)."""
    from expert_hub.auto_routing import completion_routing_ids
    from expert_hub.data import prompt_ids

    def routing_ids(endpoint: str, prompt) -> list[int]:
        if endpoint == "/v1/completions":
            return completion_routing_ids(prompt, tokenizer)
        return prompt_ids(prompt, tokenizer, bool(tokenizer.chat_template))

    right: dict[str, list[bool]] = {}
    for task, task_conversations in conversations.items():
        for messages in task_conversations:
            for form, (endpoint, prompt) in client_forms(messages).items():
                chosen = router.route(routing_ids(endpoint, prompt), profiles).task
                right.setdefault(form, []).append(chosen == expected[task])
    return {form: sum(hits) / len(hits) for form, hits in right.items()}


def _routing(base: str, profiles: dict, prompts: dict[str, list[list[int]]], conversations: dict) -> dict:
    """Accuracy per task, confusion, accuracy vs depth, vs length and per client form, ms per routing."""
    from expert_hub.auto_routing import DEFAULT_DEPTH, DEFAULT_WINDOW, TaskRouter
    from expert_hub.families import moe_layers
    from expert_hub.models import load_base, load_tokenizer

    model = load_base(base)
    expected = {task: (None if task == OUTSIDE else task) for task in prompts}
    by_depth, confusion, seconds = {}, {}, []
    for depth in range(1, len(moe_layers(model)) + 1):
        router = TaskRouter(model, depth)
        right = {}
        for task, task_prompts in prompts.items():
            started = time.perf_counter()
            chosen = [router.route(prompt, profiles).task for prompt in task_prompts]
            seconds.append((time.perf_counter() - started) / len(task_prompts))
            right[task] = sum(choice == expected[task] for choice in chosen) / len(chosen)
            if depth == DEFAULT_DEPTH:
                confusion[task] = {str(name): chosen.count(name) for name in (*TASKS, None)}
        by_depth[depth] = right
    router, whole = TaskRouter(model), TaskRouter(model, window=None)

    def accuracy(cut: int | None) -> float:
        hits = [
            whole.route(prompt[:cut], profiles).task == expected[task]
            for task, task_prompts in prompts.items()
            for prompt in task_prompts
        ]
        return sum(hits) / len(hits)

    by_length = {length: accuracy(length) for length in LENGTHS}
    long_enough = [(task, p) for task, task_prompts in prompts.items() for p in task_prompts if len(p) >= 32]
    long_accuracy = sum(router.route(p, profiles).task == expected[t] for t, p in long_enough) / len(long_enough)
    return _as_served(base, profiles, prompts, router, expected) | {
        "depth": DEFAULT_DEPTH,
        "accuracy_by_depth": by_depth,
        "confusion": confusion,
        "accuracy_by_length": by_length,
        "accuracy_whole_prompt": accuracy(None),
        "window": DEFAULT_WINDOW,
        "accuracy_prompts_32_plus": long_accuracy,
        "prompts_32_plus": len(long_enough),
        "ms_per_prompt": 1e3 * statistics.median(seconds),
        "accuracy_by_form": _form_accuracy(router, profiles, load_tokenizer(base), conversations, expected),
    }


def _as_served(base: str, profiles: dict, prompts: dict, router, expected: dict) -> dict:
    """The router as the server runs it beside a CPU engine (one torch thread, on a thread of its own, bfloat16: what
    vLLM serves the float32 demo base in) against `router` (float32): choices on every held-out prompt, and one pass
    over a burst of 24 prompts (the serving burst's), float32 and bfloat16 both on one thread."""
    from expert_hub.auto_routing import TaskRouter
    from expert_hub.models import load_base

    served = TaskRouter(load_base(base, layers=router.layers[-1].index + 1, dtype=torch.bfloat16))
    burst = [prompts[TASKS[index % len(TASKS)]][index // len(TASKS)] for index in range(24)]

    def pass_ms(chosen_router) -> float:
        chosen_router.route_many(burst, profiles)  # warm-up
        return 1e3 * _timed(lambda: chosen_router.route_many(burst, profiles), repeats=9)

    def measure() -> dict:
        pairs = [
            (task, served.route_many(task_prompts, profiles), router.route_many(task_prompts, profiles))
            for task, task_prompts in prompts.items()
        ]
        choices = [(task, a.task, b.task) for task, bf16, fp32 in pairs for a, b in zip(bf16, fp32)]
        return {
            "served_accuracy": sum(chosen == expected[task] for task, chosen, _ in choices) / len(choices),
            "served_agreement": sum(chosen == reference for _, chosen, reference in choices) / len(choices),
            "burst_pass_ms_bfloat16": pass_ms(served),
            "burst_pass_ms_float32": pass_ms(router),
        }

    threads = torch.get_num_threads()
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as thread:
        figures = thread.submit(measure).result()
    torch.set_num_threads(threads)  # the one-thread setting is also torch's default for threads started later
    return figures


def _classifier(train_texts: dict[str, list[str]], eval_texts: dict[str, list[str]], tokenizer) -> dict:
    """TF-IDF + logistic regression on the training prompts: accuracy on the six tasks, whole and cut to N tokens."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts = [text for task in TASKS for text in train_texts[task]]
    labels = [task for task in TASKS for _ in train_texts[task]]
    classifier = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=2000)).fit(texts, labels)

    def accuracy(cut: int | None) -> float:
        hits = [
            classifier.predict([text if cut is None else tokenizer.decode(tokenizer.encode(text)[:cut])])[0] == task
            for task in TASKS
            for text in eval_texts[task]
        ]
        return sum(hits) / len(hits)

    return {"accuracy": accuracy(None), "accuracy_by_length": {length: accuracy(length) for length in LENGTHS}}


def _end_task(base: str, artifacts: dict, profiles: dict, eval_records: int, console: Console) -> dict:
    """Each task's metric on its eval records: the task named, auto-routed, and the base model."""
    from expert_hub import load_model
    from expert_hub.auto_routing import TaskRouter
    from expert_hub.data import prompt_ids
    from expert_hub.models import load_base, load_tokenizer
    from expert_hub.tasks import builtin_task

    tokenizer = load_tokenizer(base)
    models = {None: load_base(base).eval()} | {task: load_model(base, path).eval() for task, path in artifacts.items()}
    router = TaskRouter(models[None])
    scores = {}
    for task in TASKS:
        spec = builtin_task(task)
        records = spec.eval_records(eval_records)
        prompts = [prompt_ids(record["messages"][:-1], tokenizer) for record in records]
        answers = [record["answers"] for record in records]
        chosen = [router.route(prompt, profiles).task for prompt in prompts]

        scores[task] = {
            "metric": spec.metric,
            "named": _score(models, tokenizer, spec, prompts, answers, [task] * len(prompts)),
            "auto": _score(models, tokenizer, spec, prompts, answers, chosen),
            "base": _score(models, tokenizer, spec, prompts, answers, [None] * len(prompts)),
        }
        console.print(f"{task}: {scores[task]}")
    return scores


def _score(models: dict, tokenizer, spec, prompts: list[list[int]], answers: list, choices: list) -> float:
    """The task's metric over all its records, each generated by the model `choices` gives it (None: the base)."""
    from expert_hub.evaluation import SCORERS, generate

    predictions = [""] * len(prompts)
    for choice in set(choices):
        indices = [i for i, c in enumerate(choices) if c == choice]
        made = generate(models[choice], tokenizer, [prompts[i] for i in indices], spec.max_new_tokens, 20)
        for i, prediction in zip(indices, made):
            predictions[i] = prediction
    return SCORERS[spec.metric](predictions, answers)


def _served_forms(url: str, conversations: dict[str, list]) -> dict[str, float]:
    """Every held-out prompt sent as `"model": "auto"` in each client form: the share the server sent to its task
    (general's to the base model), read from the `X-Expert-Task-Chosen` header."""
    jobs = [
        (form, task, endpoint, prompt)
        for task, task_conversations in conversations.items()
        for messages in task_conversations
        for form, (endpoint, prompt) in client_forms(messages).items()
    ]

    def right(job: tuple) -> bool:
        _, task, endpoint, prompt = job
        field = {"prompt": prompt} if endpoint == "/v1/completions" else {"messages": prompt}
        body = {"model": "auto", "max_tokens": 1, "temperature": 0} | field
        request = urllib.request.Request(
            url + endpoint, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            chosen = response.headers["x-expert-task-chosen"]
        return chosen == task or (task == OUTSIDE and chosen not in TASKS)

    with ThreadPoolExecutor(8) as pool:
        hits = list(pool.map(right, jobs))
    by_form: dict[str, list[bool]] = {}
    for (form, *_), hit in zip(jobs, hits):
        by_form.setdefault(form, []).append(hit)
    return {form: sum(form_hits) / len(form_hits) for form, form_hits in by_form.items()}


def _serving(base: str, root: Path, artifacts: dict, eval_prompts: dict[str, list[str]], conversations, args) -> dict:
    """Mixed completions over the six tasks, named vs auto, in interleaved rounds on one server."""
    from expert_hub.registry import Registry

    registry = Registry(root / "registry")
    for task, path in artifacts.items():
        registry.register(path, task=task, base=base)
    log = root / "server.log"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("expert-hub")),
            "serve",
            "--base",
            base,
            "--tasks",
            ",".join(TASKS),
            "--port",
            str(args.port),
            "--max-resident-tasks",
            str(len(TASKS)),
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=os.environ | {"EXPERT_HUB_HOME": str(root / "registry")},
    )
    wait_for_health(server, args.port, log)
    url = f"http://127.0.0.1:{args.port}"
    tasks = [TASKS[index % len(TASKS)] for index in range(args.requests)]
    jobs = [(task, eval_prompts[task][index // len(TASKS)]) for index, task in enumerate(tasks)]

    chosen_right: list[bool] = []  # the server's own auto choices, every auto request

    def one(job: tuple[str, str], auto: bool, max_tokens: int) -> int:
        task, text = job
        body = {"model": "auto" if auto else task, "prompt": text, "max_tokens": max_tokens, "temperature": 0}
        response = _request("POST", url + "/v1/completions", body | {"ignore_eos": True})
        if auto:
            chosen_right.append(response["model"] == task)
        return response["usage"]["completion_tokens"]

    def burst(auto: bool, max_tokens: int) -> tuple[int, float]:
        """Every job at once: output tokens, seconds."""
        started = time.perf_counter()
        with ThreadPoolExecutor(len(jobs)) as pool:
            tokens = sum(pool.map(lambda job: one(job, auto, max_tokens), jobs))
        return tokens, time.perf_counter() - started

    rates, prefill = {"named": [], "auto": []}, {"named": [], "auto": []}
    try:
        burst(auto=True, max_tokens=args.max_tokens)  # warm-up: loads every task and the router
        burst(auto=False, max_tokens=args.max_tokens)
        for _ in range(args.rounds):
            for kind in ("named", "auto"):
                tokens, seconds = burst(kind == "auto", args.max_tokens)
                rates[kind].append(tokens / seconds)
                prefill[kind].append(burst(kind == "auto", 1)[1])  # one token each: little but the prefill
        served_forms = _served_forms(url, conversations)
    finally:
        server.terminate()
        server.wait(timeout=120)
    named, auto = statistics.median(rates["named"]), statistics.median(rates["auto"])
    return {
        "named_tokens_per_s": named,
        "auto_tokens_per_s": auto,
        "ratio": auto / named,
        "round_ratios": [a / n for n, a in zip(rates["named"], rates["auto"])],  # each auto round / the named before
        "rounds": args.rounds,
        "requests": len(jobs),
        "prefill_ms_named": 1e3 * statistics.median(prefill["named"]),
        "prefill_ms_auto": 1e3 * statistics.median(prefill["auto"]),
        "server_choices_right": sum(chosen_right) / len(chosen_right),
        "served_accuracy_by_form": served_forms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="training steps per task (default: the demo base's)")
    parser.add_argument("--eval-prompts", type=int, default=60, help="held-out prompts per task")
    parser.add_argument("--eval-records", type=int, default=40, help="eval records per task for the end-task score")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8760)
    parser.add_argument("--skip-serving", action="store_true")
    args = parser.parse_args()

    from expert_hub.auto_routing import RoutingProfile
    from expert_hub.data import prompt_ids, reference_segments
    from expert_hub.demo import demo_base
    from expert_hub.models import load_tokenizer
    from expert_hub.tasks import builtin_task

    console = Console(width=150)
    base, started = demo_base(), time.perf_counter()
    tokenizer = load_tokenizer(base)

    def texts(task: str, split: str, count: int) -> list[str]:
        return ["".join(t for t, _ in reference_segments(m[:-1])) for m in builtin_task(task).examples(split, count)]

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        artifacts = _train(base, root, args.steps, console)
        profiles = {task: RoutingProfile.load(path) for task, path in artifacts.items()}
        eval_texts = {task: texts(task, "eval", args.eval_prompts) for task in (*TASKS, OUTSIDE)}
        conversations = {task: builtin_task(task).examples("eval", args.eval_prompts) for task in (*TASKS, OUTSIDE)}
        eval_prompts = {task: [prompt_ids(m[:-1], tokenizer) for m in conversations[task]] for task in conversations}
        results = {"routing": _routing(base, profiles, eval_prompts, conversations)}
        train_texts = {task: texts(task, "train", 256) for task in TASKS}
        results["classifier"] = _classifier(train_texts, eval_texts, tokenizer)
        results["end_task"] = _end_task(base, artifacts, profiles, args.eval_records, console)
        if not args.skip_serving:
            results["serving"] = _serving(base, root, artifacts, eval_texts, conversations, args)
    results["elapsed_seconds"] = time.perf_counter() - started
    results["settings"] = vars(args)
    _report(console, results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "auto_routing.json").write_text(json.dumps(results, indent=1, default=str))


def _report(console: Console, results: dict) -> None:
    routing = results["routing"]
    table = Table(
        title=f"Auto routing on the demo base: held-out prompts, depth {routing['depth']} (rows: the "
        "prompt's task; columns: where it was sent)"
    )
    table.add_column("task")
    for column in (*TASKS, "base"):
        table.add_column(column, justify="right")
    for task, row in routing["confusion"].items():
        table.add_row(task, *(str(row[name]) for name in (*TASKS, "None")))
    console.print(table)
    depth = Table(title="Accuracy per task against the routing depth (MoE layers run)")
    depth.add_column("depth")
    for task in (*TASKS, OUTSIDE):
        depth.add_column(task if task != OUTSIDE else "general -> base", justify="right")
    for layers, right in routing["accuracy_by_depth"].items():
        depth.add_row(str(layers), *(f"{right[task]:.3f}" for task in (*TASKS, OUTSIDE)))
    console.print(depth)
    lengths = Table(
        title=f"Accuracy against the prompt's first N tokens, depth {routing['depth']} (six tasks + general; the "
        f"classifier: six); the router routes on the first {routing['window']}"
    )
    for column in ("first N tokens", "routing", "TF-IDF + logistic regression"):
        lengths.add_column(column, justify="right")
    for length, accuracy in routing["accuracy_by_length"].items():
        lengths.add_row(str(length), f"{accuracy:.3f}", f"{results['classifier']['accuracy_by_length'][length]:.3f}")
    lengths.add_row(
        "whole prompt", f"{routing['accuracy_whole_prompt']:.3f}", f"{results['classifier']['accuracy']:.3f}"
    )
    console.print(lengths)
    console.print(
        f"goal: >= 95% on prompts of >= 32 tokens -> {routing['accuracy_prompts_32_plus']:.3f} "
        f"({routing['prompts_32_plus']} prompts); routing takes {routing['ms_per_prompt']:.1f} ms per prompt here"
    )
    console.print(
        f"as the server routes beside a CPU engine (bfloat16, one thread): {routing['served_accuracy']:.3f} right on "
        f"every held-out prompt, the same choice as float32 for {routing['served_agreement']:.1%}; a pass over 24 "
        f"prompts {routing['burst_pass_ms_bfloat16']:.1f} ms (float32 on one thread: "
        f"{routing['burst_pass_ms_float32']:.1f} ms)",
        soft_wrap=True,
    )
    forms = Table(title="Accuracy per form a client sends its prompt in (six tasks + general), depth 2")
    served = results.get("serving", {}).get("served_accuracy_by_form", {})
    for column in ("form", "routed as the server routes", "the server's own choices"):
        forms.add_column(column, justify="left" if column == "form" else "right")
    for form, accuracy in routing["accuracy_by_form"].items():
        forms.add_row(form, f"{accuracy:.3f}", f"{served[form]:.3f}" if form in served else "-")
    console.print(forms)
    scores = Table(title="End-task score on held-out records: the task named, auto-routed, the base model")
    for column in ("task", "metric", "named", "auto", "base", "auto / named"):
        scores.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, score in results["end_task"].items():
        ratio = score["auto"] / score["named"] if score["named"] else float("nan")
        scores.add_row(task, score["metric"], *(f"{score[k]:.3f}" for k in ("named", "auto", "base")), f"{ratio:.3f}")
    console.print(scores)
    if serving := results.get("serving"):
        console.print(
            f"serving, {serving['rounds']} interleaved rounds: named {serving['named_tokens_per_s']:.1f} tokens/s, "
            f"auto {serving['auto_tokens_per_s']:.1f} tokens/s -> {serving['ratio']:.3f} (goal >= 0.95); each auto "
            f"round against the named one before it: {min(serving['round_ratios']):.3f} to "
            f"{max(serving['round_ratios']):.3f}",
            soft_wrap=True,
        )
        console.print(
            f"the same {serving['requests']} requests at once, one token each (their prefill): named "
            f"{serving['prefill_ms_named']:.0f} ms, auto {serving['prefill_ms_auto']:.0f} ms; the server sent "
            f"{serving['server_choices_right']:.1%} of the auto requests to their own task",
            soft_wrap=True,
        )


if __name__ == "__main__":
    main()
