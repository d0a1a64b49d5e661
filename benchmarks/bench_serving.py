"""Serving throughput with tasks vs without, task load latency, and the memory a resident task takes.

Starts `expert-hub serve` on a random-weight qwen3_moe routed like DeepSeek-V2-Lite (64 experts, top-6; 512 hidden
x 8 layers, so it runs on a CPU), then,
against the running server over HTTP and in one run:
1. a warm-up round, then the base-only load: concurrent greedy completions, no task loaded -> output tokens/s;
2. loads 4 tasks with the paper's published expert sets (law, intent, summary, translation: ESFT-Token p=0.2 on
   DeepSeek-V2-Lite, 3-9 experts per layer, layers 1-8 mapped onto this model) from the registry through
   `POST /v1/tasks/{name}` -> seconds from request to servable, against what a load cannot avoid: one sha256 pass
   over the task's files plus one copy of its bytes (into the bank), both timed here on the same (warm) files;
   after the rounds below, each task is unloaded and loaded again `--load-repeats` times (a task swapped in at run
   time) and the median of those is reported beside the first load;
3. the same load spread over those 4 tasks (they share batches), alternating with base-only rounds (tasks
   resident) -> tokens/s and the ratio to the median of those interleaved base-only rounds (goal >= 0.95);
4. a stress case: 4 tasks of 12 random experts per layer, 2.5x the paper's, swapped in at run time;
5. with `--peer lora`, the same base served by plain vLLM with its multi-LoRA support and 4 rank-8 LoRA adapters
   (`lora_peer.py`): adapter loads timed, then the paper sets' mixed load alternating with base-only rounds, side by
   side with expert-hub's figures: tokens/s against each server's own base-only rounds, memory and load time per
   adapter.
The cost of a task is the extra distinct expert rows its tokens make the kernel read; the ratios show it. Every
ratio divides by base-only rounds run between the mixed ones, so warm-up and drift hit both sides alike.
Run: `.venv/bin/python benchmarks/bench_serving.py [--requests 32 --max-tokens 64] [--peer lora]`.
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

import lora_peer
import torch
from bench_registry import _sha256_pass, _timed
from rich.console import Console
from rich.table import Table

ESFT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "esft"
PAPER_TASKS = ("law", "intent", "summary", "translation")
SHAPE = dict(
    hidden_size=512,
    head_dim=64,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_hidden_layers=8,
    num_experts=64,
    num_experts_per_tok=6,
    moe_intermediate_size=256,
    vocab_size=320,
)
STRESS_EXPERTS = 12


def _request(method: str, url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body or {}).encode(), method=method, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _load(url: str, models: list[str], requests: int, max_tokens: int) -> float:
    """Output tokens per second of `requests` concurrent greedy completions cycling over `models`."""
    prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(requests)]

    def one(i: int) -> int:
        body = {
            "model": models[i % len(models)],
            "prompt": prompts[i],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        return _request("POST", url + "/v1/completions", body)["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return tokens / (time.perf_counter() - started)


def _selections(layers: int, experts: int) -> dict[str, dict[int, list[int]]]:
    """The paper's four published expert sets (their MoE layers 1.. onto ours 0..), and four random stress sets."""
    selections = {}
    for task in PAPER_TASKS:
        published = json.loads((ESFT_DATA / "expert_configs" / f"{task}.json").read_text())["experts"]
        selections[task] = {layer: sorted(published[str(layer + 1)]) for layer in range(min(layers, 26))}
    for task in range(4):
        generator = torch.Generator().manual_seed(task)
        selections[f"stress{task}"] = {
            layer: sorted(torch.randperm(experts, generator=generator)[:STRESS_EXPERTS].tolist())
            for layer in range(layers)
        }
    return selections


def _load_bound(directory: Path, nbytes: int) -> float:
    """What loading a task cannot avoid: one sha256 pass over its files and one copy of its bytes (medians of 3)."""
    source = torch.ones(nbytes // 4)
    target = torch.empty_like(source)
    hash_pass = _timed(lambda: _sha256_pass(sorted(directory.iterdir())))
    return hash_pass + _timed(lambda: target.copy_(source))


def _start(base: Path, root: Path, port: int, bank_rows: int, dtype: str) -> subprocess.Popen:
    environment = os.environ | {"EXPERT_HUB_HOME": str(root / "registry")}
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("expert-hub")),
            "serve",
            "--base",
            str(base),
            "--port",
            str(port),
            "--dtype",
            dtype,
            "--max-model-len",
            "512",
            "--max-resident-tasks",
            "4",
            "--expert-bank-rows",
            str(bank_rows),
        ],
        stdout=(root / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        env=environment,
    )
    return lora_peer.wait_for_health(server, port, root / "server.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8750)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--load-repeats", type=int, default=5, help="times each task is unloaded and loaded again")
    parser.add_argument("--peer", choices=["lora"], help="also measure plain vLLM's multi-LoRA serving")
    args = parser.parse_args()
    if not ESFT_DATA.is_dir():
        sys.exit(f"the published ESFT expert configs are expected in {ESFT_DATA}")
    if args.peer == "lora":
        lora_peer.refuse_cpu()

    from expert_hub import ExpertAdapter, ExpertSelection
    from expert_hub.models import describe_model, load_base
    from expert_hub.registry import Registry
    from expert_hub.serving import bank_rows
    from expert_hub.serving.served_tasks import adapter_task
    from expert_hub.testing import build_tiny_model

    console = Console(width=150)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        base = build_tiny_model("qwen3_moe", root / "base", **SHAPE)
        model, summary = load_base(str(base)), describe_model(str(base))
        registry = Registry(root / "registry")
        tasks = {}
        for name, experts in _selections(SHAPE["num_hidden_layers"], SHAPE["num_experts"]).items():
            adapter = ExpertAdapter.from_model(model, ExpertSelection(experts), task=name)
            tasks[name] = adapter_task(name, registry.verify(registry.register(adapter.save(root / name))), summary)
        del model
        paper = {name: tasks[name] for name in PAPER_TASKS}
        stress = {name: task for name, task in tasks.items() if name.startswith("stress")}
        default_rows = {
            "paper": bank_rows(paper, SHAPE["num_experts"], 4),
            "stress": bank_rows(stress, SHAPE["num_experts"], 4),
        }
        url = f"http://127.0.0.1:{args.port}"
        server = _start(base, root, args.port, max(default_rows.values()), args.dtype)
        rates: dict[str, list[float]] = {}
        loads: list[dict] = []

        def measure(label: str, models: list[str]) -> None:
            rates.setdefault(label, []).append(_load(url, models, args.requests, args.max_tokens))

        try:
            _load(url, [str(base)], args.requests, args.max_tokens)  # warm-up: not measured
            for _ in range(args.rounds):
                measure("base", [str(base)])
            for kind, names in (("paper", list(paper)), ("stress", list(stress))):
                for name in names:
                    load = _request("POST", f"{url}/v1/tasks/{name}")
                    loads.append(load | {"bound": _load_bound(tasks[name].directory, tasks[name].nbytes), "again": []})
                _load(url, names, args.requests, args.max_tokens)  # warm-up: not measured
                for _ in range(args.rounds):  # alternate, so drift hits both alike
                    measure(kind, names)
                    measure(f"base, {kind} tasks resident", [str(base)])
                bank = _request("GET", f"{url}/v1/tasks")["bank"]
                for name in names:
                    _request("DELETE", f"{url}/v1/tasks/{name}")
                for _ in range(args.load_repeats):  # loaded again: what a task swapped in at run time costs
                    for load in loads[-len(names) :]:
                        load["again"].append(_request("POST", f"{url}/v1/tasks/{load['task']}")["seconds"])
                        _request("DELETE", f"{url}/v1/tasks/{load['task']}")
        finally:
            server.terminate()
            server.wait(timeout=120)
        peer = _lora_peer(args, base, root) if args.peer == "lora" else None

    _report(console, args, rates, loads, bank, default_rows, paper, stress)
    if peer:
        _report_peer(console, rates, loads, bank, default_rows, paper, peer)


def _lora_peer(args, base: Path, root: Path) -> dict:
    """Plain vLLM with 4 LoRA adapters: load times, then mixed rounds alternating with base-only rounds."""
    adapters = lora_peer.make_adapters(base, root)
    url = f"http://127.0.0.1:{args.port}"
    server = lora_peer.start_plain_vllm(base, root, args.port, args.dtype)
    names = [directory.name for directory in adapters]
    rates: dict[str, list[float]] = {"lora": [], "base": []}
    try:
        loads = [lora_peer.load_adapter(url, name, directory) for name, directory in zip(names, adapters)]
        _load(url, names, args.requests, args.max_tokens)  # warm-up: not measured
        for _ in range(args.rounds):
            rates["lora"].append(_load(url, names, args.requests, args.max_tokens))
            rates["base"].append(_load(url, [str(base)], args.requests, args.max_tokens))
    finally:
        server.terminate()
        server.wait(timeout=120)
    return {"rates": rates, "loads": loads, "bytes": [lora_peer.adapter_bytes(d) for d in adapters]}


def _report(console, args, rates, loads, bank, default_rows, paper, stress) -> None:
    median = {label: statistics.median(values) for label, values in rates.items()}
    experts_per_layer = {
        kind: statistics.mean(count for task in tasks.values() for count in task.experts_per_layer.values())
        for kind, tasks in (("paper", paper), ("stress", stress))
    }
    table = Table(
        title=f"Serving: qwen3_moe {SHAPE['hidden_size']}h x {SHAPE['num_hidden_layers']} layers, "
        f"{SHAPE['num_experts']} experts top-{SHAPE['num_experts_per_tok']}, {args.dtype}, "
        f"{args.requests} concurrent requests x {args.max_tokens} tokens, median of {args.rounds} rounds after a "
        "warm-up round"
    )
    for column in ("load", "experts per task per layer", "output tokens/s", "x interleaved base-only rounds"):
        table.add_column(column, justify="left" if column == "load" else "right")
    table.add_row("base model, no task loaded", "-", f"{median['base']:,.1f}", "-")
    ratios = {}
    for kind, label in (("paper", "4 tasks: the paper's expert sets"), ("stress", "4 tasks: 12 random experts/layer")):
        resident = median[f"base, {kind} tasks resident"]
        ratios[kind] = median[kind] / resident
        table.add_row(
            f"  base-only rounds between the {kind} rounds (tasks resident)", "-", f"{resident:,.1f}", "1.000"
        )
        table.add_row(
            f"mixed over {label}", f"{experts_per_layer[kind]:.1f}", f"{median[kind]:,.1f}", f"{ratios[kind]:.3f}"
        )
    console.print(table)
    console.print(
        f"goal: mixed / interleaved base-only >= 0.95 -> paper sets {ratios['paper']:.3f}, "
        f"stress {ratios['stress']:.3f}"
    )

    loads_table = Table(
        title="Task loads (POST /v1/tasks/{name} from the registry, while idle): request to servable, against one "
        f"sha256 pass over the task's files + one copy of its bytes; the first load of each, then the median of "
        f"{args.load_repeats} more (unloaded between)"
    )
    for column in (
        "task",
        "MiB of experts",
        "bound ms",
        "first ms",
        "first x bound",
        "again ms",
        "again x bound",
        "MiB/s",
    ):
        loads_table.add_column(column, justify="left" if column == "task" else "right")
    again = {load["task"]: statistics.median(load["again"]) for load in loads}
    for load in loads:
        mib = load["bytes"] / 2**20
        loads_table.add_row(
            load["task"],
            f"{mib:.2f}",
            f"{load['bound'] * 1e3:.1f}",
            f"{load['seconds'] * 1e3:.1f}",
            f"{load['seconds'] / load['bound']:.2f}",
            f"{again[load['task']] * 1e3:.1f}",
            f"{again[load['task']] / load['bound']:.2f}",
            f"{mib / again[load['task']]:.0f}",
        )
    console.print(loads_table)
    first = statistics.median(load["seconds"] / load["bound"] for load in loads)
    loaded_again = statistics.median(again[load["task"]] / load["bound"] for load in loads)
    console.print(f"task load: median {loaded_again:.2f}x its bound (the first load of each task: median {first:.2f}x)")

    row_mib = bank["bytes_per_row"] / 2**20  # one expert row in every MoE layer, as the server allocated it
    for kind, tasks in (("paper", paper), ("stress", stress)):
        task_mib = statistics.mean(t.nbytes for t in tasks.values()) / 2**20
        bank_mib = default_rows[kind] * row_mib
        console.print(
            f"memory per resident task, {kind} sets: the default bank for 4 of them is {default_rows[kind]} "
            f"rows/layer = {bank_mib:.1f} MiB, {bank_mib / 4:.1f} MiB per task for {task_mib:.1f} MiB of "
            f"experts each ({bank_mib / 4 / task_mib:.2f}x)"
        )


def _report_peer(console, rates, loads, bank, default_rows, paper, peer) -> None:
    """expert-hub's paper-set figures beside plain vLLM's multi-LoRA on the same base, load and machine."""
    table = Table(
        title="The peer: 4 adapters on the same base and load, each system against its own interleaved base-only rounds"
    )
    for column in (
        "system",
        "base-only tokens/s",
        "mixed tokens/s",
        "mixed / base",
        "MiB per adapter",
        "MiB held per resident adapter",
        "load ms (median)",
    ):
        table.add_column(column, justify="left" if column == "system" else "right")
    base, mixed = statistics.median(rates["base, paper tasks resident"]), statistics.median(rates["paper"])
    paper_loads = [load["seconds"] for load in loads if load["task"] in paper]
    held = default_rows["paper"] * bank["bytes_per_row"] / 4
    table.add_row(
        "expert-hub, ESFT experts (the paper's sets)",
        f"{base:,.1f}",
        f"{mixed:,.1f}",
        f"{mixed / base:.3f}",
        f"{statistics.mean(t.nbytes for t in paper.values()) / 2**20:.2f}",
        f"{held / 2**20:.2f}",
        f"{statistics.median(paper_loads) * 1e3:.1f}",
    )
    lora_base, lora_mixed = (statistics.median(peer["rates"][kind]) for kind in ("base", "lora"))
    lora_mib = statistics.mean(peer["bytes"]) / 2**20
    table.add_row(
        f"plain vLLM, multi-LoRA (rank {lora_peer.RANK}, attention)",
        f"{lora_base:,.1f}",
        f"{lora_mixed:,.1f}",
        f"{lora_mixed / lora_base:.3f}",
        f"{lora_mib:.2f}",
        f"{lora_mib:.2f}",  # a slot of --max-lora-rank 8 holds exactly a rank-8 adapter
        f"{statistics.median(peer['loads']) * 1e3:.1f}",
    )
    console.print(table)


if __name__ == "__main__":
    main()
