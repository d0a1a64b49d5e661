"""Serving throughput with tasks vs without, task load latency, and the memory a resident task takes.

Starts `expert-hub serve` on a random-weight qwen3_moe (or `--base` for your own model) with 4 registered tasks,
then, against the running server over HTTP and in one run:
1. the base-only load: concurrent greedy completions with no task loaded -> output tokens/s;
2. loads the 4 tasks through `POST /v1/tasks/{name}` -> seconds vs bytes copied;
3. the same load spread over the 4 tasks (they share batches) -> output tokens/s, and the ratio (goal >= 0.95).
Run: `.venv/bin/python benchmarks/bench_serving.py [--requests 32 --max-tokens 64]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

SHAPE = dict(hidden_size=512, head_dim=64, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=8,
             num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256, vocab_size=320)
TASKS = 4


def _post(url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _load(url: str, models: list[str], requests: int, max_tokens: int) -> float:
    """Output tokens per second of `requests` concurrent greedy completions cycling over `models`."""
    prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(requests)]

    def one(i: int) -> int:
        body = {"model": models[i % len(models)], "prompt": prompts[i], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        return _post(url + "/v1/completions", body)["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8750)
    args = parser.parse_args()

    from expert_hub import ExpertAdapter, ExpertSelection
    from expert_hub.models import load_base
    from expert_hub.registry import Registry
    from expert_hub.serving import bank_rows
    from expert_hub.serving.tasks import adapter_task
    from expert_hub.testing import build_tiny_model

    console = Console(width=150)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        base = build_tiny_model("qwen3_moe", root / "base", **SHAPE)
        model = load_base(str(base))
        registry = Registry(root / "registry")
        expert_bytes = 0
        for task in range(TASKS):  # ~12 experts per layer each, overlapping between tasks
            generator = torch.Generator().manual_seed(task)
            selection = ExpertSelection({layer: sorted(torch.randperm(64, generator=generator)[:12].tolist())
                                         for layer in range(SHAPE["num_hidden_layers"])})
            adapter = ExpertAdapter.from_model(model, selection, task=f"task{task}")
            expert_bytes = adapter.nbytes
            registry.register(adapter.save(root / f"adapter{task}"))
        tasks = {f"task{t}": adapter_task(f"task{t}", root / f"adapter{t}") for t in range(TASKS)}
        bank_rows_per_layer = bank_rows(tasks, SHAPE["num_experts"], TASKS)
        environment = os.environ | {"EXPERT_HUB_HOME": str(root / "registry")}
        environment.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        log = (root / "server.log").open("w")
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("expert-hub")), "serve", "--base", str(base), "--port", str(args.port),
             "--dtype", "float32", "--max-model-len", "512", "--max-resident-tasks", str(TASKS)],
            stdout=log, stderr=subprocess.STDOUT, env=environment)
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(url + "/health", timeout=5)
                    break
                except OSError:
                    if server.poll() is not None:
                        sys.exit((root / "server.log").read_text()[-3000:])
                    time.sleep(1)
            _load(url, [str(base)], 4, 8)  # warm-up
            base_rates = [_load(url, [str(base)], args.requests, args.max_tokens) for _ in range(args.rounds)]
            loads = [_post(f"{url}/v1/tasks/task{task}") for task in range(TASKS)]
            names = [f"task{task}" for task in range(TASKS)]
            _load(url, names, 4, 8)
            task_rates = [_load(url, names, args.requests, args.max_tokens) for _ in range(args.rounds)]
        finally:
            server.terminate()
            server.wait(timeout=120)

    base_rate, task_rate = sorted(base_rates)[len(base_rates) // 2], sorted(task_rates)[len(task_rates) // 2]
    table = Table(title=f"Serving on the CPU: qwen3_moe {SHAPE['hidden_size']}h x {SHAPE['num_hidden_layers']} layers, "
                        f"64 experts top-8, {args.requests} concurrent requests x {args.max_tokens} tokens")
    table.add_column("load")
    table.add_column("output tokens/s (median)", justify="right")
    table.add_row("base model, no task loaded", f"{base_rate:,.1f}")
    table.add_row(f"mixed over {TASKS} resident tasks", f"{task_rate:,.1f}")
    console.print(table)
    console.print(f"ratio tasks / base: {task_rate / base_rate:.3f} (goal >= 0.95)")
    for result in loads:
        console.print(f"load {result['task']}: {result['seconds'] * 1e3:.1f} ms for {result['bytes'] / 2**20:.2f} MiB "
                      f"of experts ({result['bytes'] / 2**20 / max(result['seconds'], 1e-9):.0f} MiB/s)")
    row_bytes = 3 * SHAPE["hidden_size"] * SHAPE["moe_intermediate_size"] * 4  # gate, up, down in float32
    bank_bytes = bank_rows_per_layer * SHAPE["num_hidden_layers"] * row_bytes
    console.print(f"memory per resident task: {bank_bytes / TASKS / 2**20:.1f} MiB of preallocated bank rows "
                  f"({bank_rows_per_layer} rows/layer for {TASKS} tasks) for {expert_bytes / 2**20:.1f} MiB of experts "
                  f"each ({bank_bytes / TASKS / expert_bytes:.2f}x; `--expert-bank-rows` sizes the bank exactly)")


if __name__ == "__main__":
    main()
