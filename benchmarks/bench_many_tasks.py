"""A hub of many tasks: N registered tasks on one server, requests following a Zipf(1.1) law over them.

On the serving benchmark's base (`bench_serving.SHAPE`: qwen3_moe 512 hidden x 8 layers, 64 experts top-6), served
in bfloat16, with N = 8, 64 and 512 registered tasks whose expert sets have the paper's sizes (per layer, a count
drawn from the published ESFT-Token expert configs, 2-9; experts at random; weights = the base's experts plus
noise), `expert-hub serve` with its default bank, host-memory tier and waiting, and in one run per N:
1. rounds of streamed completions (`--requests` of `--max-tokens` tokens, ignoring EOS) at 16 and 32 in flight,
   task rounds (each request's task drawn from Zipf(1.1) over the N, a new draw each round) alternating with
   base-only rounds, after a warm-up task round -> tokens/s of each and their ratio (median over rounds), TTFT and
   end-to-end latency p50/p99 of each, requests failed, task loads per second, where each task request's task
   was found (already resident / reloaded from host memory / loaded from disk), the longest any request waited;
2. N = 64 with a bank that holds about 16 of them and a host-memory tier of 0.5 GiB (so tasks are evicted and
   reloaded, from memory and from disk, every round): ten rounds at 32 in flight and the server's memory (all its
   processes) after each: round 10 against round 2; and every reload from host memory timed in the worker against
   a plain copy of the same bytes here, on one thread as the worker copies;
3. the same comparison for reloads one at a time on an otherwise idle server (24 tasks, a bank for about 8, a tier
   for all 24, each task asked twice in turn: the second time every one comes back from host memory), which
   separates the reload's own cost from the contention of a loaded 2-core machine;
4. start-up: `serve --all-tasks` until /health answers, with 1 and with 1,000 registered tasks.
Writes `benchmarks/results/many_tasks.{json,md,png}` (ratio and task p99 against N).
Run: `.venv/bin/python benchmarks/bench_many_tasks.py [--sizes 8,64,512] [--requests 128] [--max-tokens 32]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lora_peer
import psutil
import torch
from bench_serving import ESFT_DATA, PAPER_TASKS, SHAPE
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
ZIPF = 1.1


def _paper_counts() -> list[int]:
    """Experts per layer in the paper's published expert sets (every layer of every task)."""
    counts = []
    for task in PAPER_TASKS:
        published = json.loads((ESFT_DATA / "expert_configs" / f"{task}.json").read_text())["experts"]
        counts += [len(experts) for experts in published.values()]
    return counts


def _register_tasks(base: Path, root: Path, registry_home: Path, count: int, counts: list[int]) -> list[str]:
    """`count` tasks of paper-sized random expert sets, in bfloat16, registered for `base`."""
    from expert_hub import ExpertAdapter, ExpertSelection
    from expert_hub.models import load_base
    from expert_hub.registry import Registry

    model, registry, draw = load_base(str(base)), Registry(registry_home), random.Random(0)
    names = []
    for index in range(count):
        layers = range(SHAPE["num_hidden_layers"])
        selection = {layer: sorted(draw.sample(range(SHAPE["num_experts"]), draw.choice(counts))) for layer in layers}
        adapter = ExpertAdapter.from_model(model, ExpertSelection(selection), task=f"t{index}")
        generator = torch.Generator().manual_seed(index)
        adapter.tensors = {
            key: (tensor + 0.02 * torch.randn(tensor.shape, generator=generator)).to(torch.bfloat16)
            for key, tensor in adapter.tensors.items()
        }
        directory = adapter.save(root / "staging")
        registry.register(directory)
        shutil.rmtree(directory)
        names.append(f"t{index}")
    return names


def _start(
    base: Path, root: Path, registry_home: Path, port: int, options: list[str], env: dict | None = None
) -> subprocess.Popen:
    log = root / f"server-{port}.log"
    server = subprocess.Popen(
        [
            *(str(Path(sys.executable).with_name("expert-hub")), "serve", "--base", str(base), "--port", str(port)),
            *("--dtype", "bfloat16", "--max-model-len", "512", *options),
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=os.environ | {"EXPERT_HUB_HOME": str(registry_home)} | (env or {}),
    )
    return lora_peer.wait_for_health(server, port, log)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=120)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=600) as response:
        return json.loads(response.read())


def _stream(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: status, time to first token, end-to-end time, tokens."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"}, method="POST"
    )
    started, first, tokens = time.perf_counter(), None, 0
    try:
        with urllib.request.urlopen(request, timeout=900) as response:
            for line in response:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except urllib.error.HTTPError as error:
        return {"status": error.code, "seconds": time.perf_counter() - started}
    return {"status": 200, "ttft": first, "seconds": time.perf_counter() - started, "tokens": tokens}


def _round(url: str, models: list[str], in_flight: int, max_tokens: int) -> dict:
    started = time.perf_counter()
    prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(len(models))]
    with ThreadPoolExecutor(in_flight) as clients:
        answers = list(clients.map(lambda i: _stream(url, models[i], prompts[i], max_tokens), range(len(models))))
    seconds = time.perf_counter() - started
    served = [answer for answer in answers if answer["status"] == 200]
    return {
        "tokens_per_second": sum(answer["tokens"] for answer in served) / seconds,
        "seconds": seconds,
        "failed": len(answers) - len(served),
        "ttft": [answer["ttft"] for answer in served if answer["ttft"] is not None],
        "latency": [answer["seconds"] for answer in served],
    }


def _zipf(names: list[str], count: int, seed: int) -> list[str]:
    weights = [1 / (rank + 1) ** ZIPF for rank in range(len(names))]
    return random.Random(seed).choices(names, weights, k=count)


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def _scheduler(url: str) -> dict:
    return _get(url + "/v1/tasks?limit=1")["scheduler"]


def _load_figures(url: str, base: str, names: list[str], args, in_flight: int) -> dict:
    """Task rounds alternating with base-only rounds, after a warm-up task round."""
    _round(url, _zipf(names, args.requests, seed=0), in_flight, args.max_tokens)  # warm-up: not measured
    rounds = {"base": [], "tasks": []}
    before, started = _scheduler(url), time.perf_counter()
    task_seconds = 0.0
    for number in range(args.rounds):
        rounds["base"].append(_round(url, [base] * args.requests, in_flight, args.max_tokens))
        rounds["tasks"].append(_round(url, _zipf(names, args.requests, seed=1 + number), in_flight, args.max_tokens))
        task_seconds += rounds["tasks"][-1]["seconds"]
    after = _scheduler(url)
    hits = {tier: after["hits"][tier] - before["hits"][tier] for tier in after["hits"]}
    figures = {"in_flight": in_flight, "hits": hits, "loads_per_second": (hits["memory"] + hits["disk"]) / task_seconds}
    figures["longest_wait_seconds"] = after["longest_wait_seconds"]
    figures["timeouts"] = after["timeouts"] - before["timeouts"]
    for kind, measured in rounds.items():
        ttft = [value for one in measured for value in one["ttft"]]
        latency = [value for one in measured for value in one["latency"]]
        figures[kind] = {
            "tokens_per_second": statistics.median(one["tokens_per_second"] for one in measured),
            "failed": sum(one["failed"] for one in measured),
            "ttft_p50": _percentile(ttft, 0.5),
            "ttft_p99": _percentile(ttft, 0.99),
            "latency_p50": _percentile(latency, 0.5),
            "latency_p99": _percentile(latency, 0.99),
        }
    figures["ratio"] = figures["tasks"]["tokens_per_second"] / figures["base"]["tokens_per_second"]
    figures["p99_ratio"] = figures["tasks"]["latency_p99"] / figures["base"]["latency_p99"]
    figures["seconds"] = time.perf_counter() - started
    return figures


def _memory(server: subprocess.Popen) -> dict[str, int]:
    """Resident memory of the server and of every process it started, by process name."""
    process = psutil.Process(server.pid)
    by_name: dict[str, int] = {}
    for member in [process, *process.children(recursive=True)]:
        name = "API server" if member.pid == server.pid else member.name()
        by_name[name] = by_name.get(name, 0) + member.memory_info().rss
    return by_name


def _soak(url: str, server: subprocess.Popen, names: list[str], base: str, args) -> dict:
    control = []  # the same server on base-only rounds first: what vLLM itself grows by under this load
    for _ in range(10):
        _round(url, [base] * args.requests, 32, args.max_tokens)
        control.append(sum(_memory(server).values()))
    memory, tier, failed = [], [], 0
    for number in range(10):
        failed += _round(url, _zipf(names, args.requests, seed=100 + number), 32, args.max_tokens)["failed"]
        memory.append(_memory(server))
        tier.append(_get(url + "/v1/tasks?limit=1")["bank"]["host_cache_bytes"])
    listing = _get(url + "/v1/tasks?limit=1000")
    ratios = _reloads_against_a_copy(listing)
    total = [sum(by_name.values()) for by_name in memory]
    return {
        "memory_mib": [round(value / 2**20, 1) for value in total],
        "memory_mib_by_process": {
            round_number: {name: round(value / 2**20, 1) for name, value in memory[round_number - 1].items()}
            for round_number in (2, 10)
        },
        "host_tier_mib": [round(value / 2**20, 1) for value in tier],
        "round10_vs_round2": total[9] / total[1],
        "base_only_memory_mib": [round(value / 2**20, 1) for value in control],
        "base_only_round10_vs_round2": control[9] / control[1],
        "failed": failed,
        "hits": listing["scheduler"]["hits"],
        "reloads_from_memory": len(ratios["cold"]),
        "reload_vs_memcpy_median": statistics.median(ratios["cold"]) if ratios["cold"] else None,
        "reload_vs_warm_memcpy_median": statistics.median(ratios["warm"]) if ratios["warm"] else None,
        "bank": listing["bank"],
    }


def _reloads_against_a_copy(listing: dict) -> dict[str, list[float]]:
    """For each task last loaded from host memory (`GET /v1/tasks`): its time in the worker against a plain
    one-thread copy of the same bytes here (as the worker copies: on its one compute core), from memory ("cold":
    the last-level cache flushed before each copy, as a reload finds the tier's rows and the bank's rows) and, for
    reference, from a warm cache (a task's bytes are about this machine's 32 MiB L3)."""
    reloads = [task["last_load"] for task in listing["data"] if (task["last_load"] or {}).get("from") == "memory"]
    ratios, threads = {"cold": [], "warm": []}, torch.get_num_threads()
    torch.set_num_threads(1)
    flush = torch.zeros(256 * 2**20, dtype=torch.uint8)
    for reload in reloads:
        source = torch.ones(reload["bytes"] // 2, dtype=torch.bfloat16)
        target = torch.empty_like(source)
        for kind in ratios:
            copies = []
            for _ in range(5):
                if kind == "cold":
                    flush.add_(1)
                started = time.perf_counter()
                target.copy_(source)
                copies.append(time.perf_counter() - started)
            ratios[kind].append(reload["copy_seconds"] / statistics.median(copies))
    torch.set_num_threads(threads)
    return ratios


def _idle_reloads(base: Path, root: Path, home: Path, names: list[str], port: int) -> dict:
    """Reloads from host memory one at a time on an otherwise idle server: 24 tasks, a bank that holds about 8,
    a tier that holds them all; each task asked once (loaded from disk), then again in the same order (every one
    evicted meanwhile, so reloaded from memory)."""
    url = f"http://127.0.0.1:{port}"
    options = ["--tasks", ",".join(names), "--expert-bank-rows", "40", "--task-cache-gb", "2"]
    server = _start(base, root, home, port, options)
    try:
        for _ in range(2):
            for name in names:
                _stream(url, name, "the quick brown fox", 1)
        ratios = _reloads_against_a_copy(_get(url + "/v1/tasks?limit=1000"))
    finally:
        _stop(server)
    cold, warm = ratios["cold"], ratios["warm"]
    return {
        "reloads": len(cold),
        "median": statistics.median(cold),
        "max": max(cold),
        "warm_median": statistics.median(warm),
    }


def _start_up(base: Path, root: Path, port: int) -> dict:
    """Seconds to a ready `serve --all-tasks` with 1 and with 1,000 registered (small) tasks."""
    from expert_hub import ExpertAdapter, ExpertSelection
    from expert_hub.models import load_base
    from expert_hub.registry import Registry

    model, seconds = load_base(str(base)), {}
    for count in (1, 1000):
        home = root / f"registry-{count}"
        registry = Registry(home)
        for index in range(count):
            selection = ExpertSelection({index % 8: [index % 64]})
            adapter = ExpertAdapter.from_model(model, selection, task=f"s{index}")
            adapter.tensors = {key: tensor.to(torch.bfloat16) for key, tensor in adapter.tensors.items()}
            registry.register(adapter.save(root / "staging"))
            shutil.rmtree(root / "staging")
        started = time.perf_counter()
        server = _start(base, root, home, port, ["--all-tasks"])
        seconds[count] = time.perf_counter() - started
        _stop(server)
    return {
        "one_task_seconds": seconds[1],
        "thousand_tasks_seconds": seconds[1000],
        "ratio": seconds[1000] / seconds[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,64,512")
    parser.add_argument("--in-flight", default="16,32")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8760)
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: soak, start-up")
    args = parser.parse_args()
    if not ESFT_DATA.is_dir():
        sys.exit(f"the published ESFT expert configs are expected in {ESFT_DATA}")
    from expert_hub.testing import build_tiny_model

    console, sizes = Console(width=160), [int(size) for size in args.sizes.split(",")]
    results: dict = {"settings": vars(args), "sizes": {}}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        base = build_tiny_model("qwen3_moe", root / "base", **SHAPE)
        home = root / "registry"
        started = time.perf_counter()
        names = _register_tasks(base, root, home, max(sizes), _paper_counts())
        console.print(f"{len(names)} tasks registered in {time.perf_counter() - started:.0f} s")
        url = f"http://127.0.0.1:{args.port}"
        for size in sizes:
            selected = names[:size]
            options = ["--all-tasks"] if size == len(names) else ["--tasks", ",".join(selected)]
            server = _start(base, root, home, args.port, options)
            try:
                results["sizes"][size] = [
                    _load_figures(url, str(base), selected, args, int(in_flight))
                    for in_flight in args.in_flight.split(",")
                ]
                results["sizes"][size][0]["bank"] = _get(url + "/v1/tasks?limit=1")["bank"]
            finally:
                _stop(server)
            console.print(f"N = {size}: {json.dumps(results['sizes'][size])[:600]}")
        if "soak" not in args.skip:
            soak_names = names[:64]
            soak_options = ["--tasks", ",".join(soak_names), "--expert-bank-rows", "80", "--task-cache-gb", "0.5"]
            server = _start(base, root, home, args.port, soak_options)
            try:
                results["soak"] = _soak(url, server, soak_names, str(base), args)
            finally:
                _stop(server)
            results["idle_reloads"] = _idle_reloads(base, root, home, names[:24], args.port)
        if "start-up" not in args.skip:
            results["start_up"] = _start_up(base, root, args.port)
    _report(console, results)


def _report(console: Console, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = Table(title="Many tasks: Zipf(1.1) task rounds against base-only rounds, same server, bfloat16, 2-core CPU")
    for column in (
        "N", "in flight", "task tok/s", "base tok/s", "ratio", "task TTFT p50/p99 s", "base TTFT p50/p99 s",
        "task e2e p50/p99 s", "base e2e p50/p99 s", "failed", "loads/s", "resident/memory/disk", "longest wait s",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for size, runs in results["sizes"].items():
        for run in runs:
            tasks, base, hits = run["tasks"], run["base"], run["hits"]
            table.add_row(
                str(size),
                str(run["in_flight"]),
                f"{tasks['tokens_per_second']:.0f}",
                f"{base['tokens_per_second']:.0f}",
                f"{run['ratio']:.3f}",
                f"{tasks['ttft_p50']:.2f} / {tasks['ttft_p99']:.2f}",
                f"{base['ttft_p50']:.2f} / {base['ttft_p99']:.2f}",
                f"{tasks['latency_p50']:.2f} / {tasks['latency_p99']:.2f}",
                f"{base['latency_p50']:.2f} / {base['latency_p99']:.2f}",
                str(tasks["failed"] + base["failed"]),
                f"{run['loads_per_second']:.2f}",
                f"{hits['bank']}/{hits['memory']}/{hits['disk']}",
                f"{run['longest_wait_seconds']:.2f}",
            )
    console.print(table)
    lines = []
    if soak := results.get("soak"):
        lines.append(
            f"soak (N = 64, bank of 80 rows/layer, host tier 0.5 GiB, 10 rounds at 32 in flight): memory MiB "
            f"{soak['memory_mib']} (host tier MiB {soak['host_tier_mib']}); "
            f"round 10 / round 2 = {soak['round10_vs_round2']:.4f} (goal within 2%; ten base-only rounds on the same "
            f"server first, MiB {soak['base_only_memory_mib']}: {soak['base_only_round10_vs_round2']:.4f}); "
            f"failed {soak['failed']}; "
            f"hits {soak['hits']}; {soak['reloads_from_memory']} tasks last reloaded from host memory, median "
            f"{soak['reload_vs_memcpy_median']:.2f}x a plain one-thread copy of the same bytes from memory (goal <= 1.2x; "
            f"{soak['reload_vs_warm_memcpy_median']:.2f}x a copy from a warm cache)"
        )
    if idle := results.get("idle_reloads"):
        lines.append(
            f"reloads from host memory one at a time on an idle server ({idle['reloads']} tasks): median "
            f"{idle['median']:.2f}x, at most {idle['max']:.2f}x a plain one-thread copy of the same bytes from memory "
            f"(goal <= 1.2x; median {idle['warm_median']:.2f}x a copy from a warm cache)"
        )
    if start_up := results.get("start_up"):
        lines.append(
            f"start-up, serve --all-tasks to /health: 1 task {start_up['one_task_seconds']:.1f} s, 1,000 tasks "
            f"{start_up['thousand_tasks_seconds']:.1f} s = {start_up['ratio']:.3f}x (goal <= 1.2x)"
        )
    for line in lines:
        console.print(line)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "many_tasks.json").write_text(json.dumps(results, indent=1))
    recorder = Console(record=True, width=200)
    recorder.print(table)
    for line in lines:
        recorder.print(line)
    (RESULTS / "many_tasks.md").write_text(
        f"# bench_many_tasks.py ({time.strftime('%Y-%m-%d')}, 2-core CPU)\n\n```\n{recorder.export_text()}```\n"
    )
    figure, (ratio_axis, p99_axis) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = sorted(results["sizes"], key=int)
    for position, in_flight in enumerate(run["in_flight"] for run in results["sizes"][sizes[0]]):
        runs = [results["sizes"][size][position] for size in sizes]
        ratio_axis.plot(
            [int(s) for s in sizes], [run["ratio"] for run in runs], marker="o", label=f"{in_flight} in flight"
        )
        p99_axis.plot(
            [int(s) for s in sizes], [run["p99_ratio"] for run in runs], marker="o", label=f"{in_flight} in flight"
        )
    ratio_axis.axhline(0.9, color="grey", linestyle="--", label="goal (N = 64)")
    p99_axis.axhline(2.0, color="grey", linestyle="--", label="goal")
    for axis, title in ((ratio_axis, "task tokens/s / base tokens/s"), (p99_axis, "task p99 / base p99 (end to end)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("registered tasks (N)")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "many_tasks.png", dpi=120)


if __name__ == "__main__":
    main()
