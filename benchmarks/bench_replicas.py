"""`serve --replicas` on Ray Serve: what the ingress adds to a request, and how often affinity finds a task resident.

On the serving benchmark's base (`bench_serving.SHAPE`, bfloat16) with paper-sized tasks (`bench_many_tasks.py`):
1. ingress latency: the same server options run as `serve` and as `serve --replicas 1`, one request at a time
   (`--latency-requests` streamed completions of one token, for a resident task): p50 / p99 end-to-end of each and
   the difference, which is what the Ray Serve proxy, the ingress and the replica hop add;
2. affinity: 16 tasks, Zipf(1.1), 8 in flight, on `serve --replicas 2` with a bank for about 3 tasks per replica,
   against the alternative without Ray: two plain `serve` processes (one core each, as the replicas get) with the
   same bank, each request sent to one of them at random. Per setup: where each request's task was found (the
   bank, host memory, disk: the servers' own counters), the bank-hit rate, and for the replicas the share of each
   task's requests that its most-used replica served.
Writes `benchmarks/results/replicas.{json,md}`.
Run: `.venv/bin/python benchmarks/bench_replicas.py [--requests 256] [--latency-requests 60]`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_many_tasks import RESULTS, _get, _paper_counts, _percentile, _register_tasks, _stop, _stream, _zipf
from bench_many_tasks import _start as start_server
from bench_serving import SHAPE
from rich.console import Console
from rich.table import Table

TASKS = 16
BANK_ROWS = "24"  # about 3 paper-sized tasks per server


def _start(base: Path, root: Path, home: Path, port: int, options: list[str], env: dict | None = None):
    """`bench_many_tasks`' server start, and for `--replicas` until every replica serves (/health answers once
    one does)."""
    server = start_server(base, root, home, port, options, env)
    if "--replicas" in options:
        replicas = int(options[options.index("--replicas") + 1])
        while len(_get(f"http://127.0.0.1:{port}/v1/tasks")["replicas"]) < replicas:
            time.sleep(1)
    return server


def _latencies(url: str, task: str, count: int) -> list[float]:
    _stream(url, task, "warm up", 1)
    return [_stream(url, task, f"request {index}: the quick brown fox", 1)["seconds"] for index in range(count)]


def _ingress_latency(base: Path, root: Path, home: Path, names: list[str], args) -> dict:
    options = ["--tasks", ",".join(names[:4])]
    figures = {}
    for label, extra in (("serve", []), ("serve --replicas 1", ["--replicas", "1"])):
        server = _start(base, root, home, args.port, options + extra)
        try:
            latencies = _latencies(f"http://127.0.0.1:{args.port}", names[0], args.latency_requests)
        finally:
            _stop(server)
        figures[label] = {"p50": _percentile(latencies, 0.5), "p99": _percentile(latencies, 0.99)}
    direct, ray = figures["serve"], figures["serve --replicas 1"]
    return figures | {
        "added_p50_ms": 1000 * (ray["p50"] - direct["p50"]),
        "added_p99_ms": 1000 * (ray["p99"] - direct["p99"]),
    }


def _load(urls: list[str], models: list[str], in_flight: int, max_tokens: int) -> list[dict]:
    """Each request to a server drawn at random (one URL: the replicas' endpoint)."""
    draw = random.Random(7)
    targets = [draw.choice(urls) for _ in models]
    with ThreadPoolExecutor(in_flight) as clients:
        return list(
            clients.map(lambda i: _stream(targets[i], models[i], f"request {i}", max_tokens), range(len(models)))
        )


def _hits(listing: dict) -> dict[str, int]:
    return {tier: listing["scheduler"]["hits"][tier] for tier in ("bank", "memory", "disk")}


def _affinity(base: Path, root: Path, home: Path, names: list[str], args) -> dict:
    served, options = names[:TASKS], ["--tasks", ",".join(names[:TASKS]), "--expert-bank-rows", BANK_ROWS]
    models = _zipf(served, args.requests, seed=3)
    results = {}
    url = f"http://127.0.0.1:{args.port}"
    server = _start(base, root, home, args.port, [*options, "--replicas", "2"])
    try:
        answers = _load([url], models, 8, args.max_tokens)
        listing = _get(url + "/v1/tasks?limit=1000")
        with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
            metrics = response.read().decode()
    finally:
        _stop(server)
    hits = [replica["scheduler"]["hits"] for replica in listing["replicas"]]
    per_task: dict[str, dict[str, float]] = {}
    for replica, task, value in re.findall(
        r'expert_hub_task_requests_total\{replica="(\w+)",task="(\w+)"\} ([0-9.]+)', metrics
    ):
        per_task.setdefault(task, {})[replica] = float(value)
    requests = {task: counts for task, counts in per_task.items() if task in served}
    kept = sum(max(counts.values()) for counts in requests.values()) / sum(sum(c.values()) for c in requests.values())
    results["replicas"] = {
        "failed": sum(answer["status"] != 200 for answer in answers),
        "hits": {tier: sum(each[tier] for each in hits) for tier in ("bank", "memory", "disk")},
        "on_most_used_replica": kept,
    }
    ports = [args.port + 1, args.port + 2]
    servers = []
    try:
        for core, port in enumerate(ports):  # one core each, as the replicas get on this machine
            servers.append(_start(base, root, home, port, options, {"VLLM_CPU_OMP_THREADS_BIND": str(core)}))
        answers = _load([f"http://127.0.0.1:{port}" for port in ports], models, 8, args.max_tokens)
        listings = [_get(f"http://127.0.0.1:{port}/v1/tasks?limit=1") for port in ports]
    finally:
        for each in servers:
            _stop(each)
    results["two servers, random"] = {
        "failed": sum(answer["status"] != 200 for answer in answers),
        "hits": {tier: sum(_hits(listing)[tier] for listing in listings) for tier in ("bank", "memory", "disk")},
    }
    for figures in results.values():
        figures["bank_hit_rate"] = figures["hits"]["bank"] / sum(figures["hits"].values())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--latency-requests", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args()
    from expert_hub.testing import build_tiny_model

    console = Console(width=160)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        base = build_tiny_model("qwen3_moe", root / "base", **SHAPE)
        home = root / "registry"
        names = _register_tasks(base, root, home, TASKS, _paper_counts())
        results = {"settings": vars(args), "ingress": _ingress_latency(base, root, home, names, args)}
        console.print(json.dumps(results["ingress"]))
        results["affinity"] = _affinity(base, root, home, names, args)
    _report(console, results)


def _report(console: Console, results: dict) -> None:
    ingress = results["ingress"]
    latency = Table(title="One-token completions, one at a time")
    for column in ("", "p50 ms", "p99 ms"):
        latency.add_column(column, justify="right")
    for label in ("serve", "serve --replicas 1"):
        latency.add_row(label, f"{1000 * ingress[label]['p50']:.1f}", f"{1000 * ingress[label]['p99']:.1f}")
    latency.add_row("added by Ray Serve", f"{ingress['added_p50_ms']:.1f}", f"{ingress['added_p99_ms']:.1f}")
    affinity = Table(title=f"{TASKS} tasks, Zipf(1.1), 8 in flight, a bank for about 3 tasks per server")
    for column in ("", "failed", "bank / memory / disk", "bank-hit rate", "a task's requests on its main replica"):
        affinity.add_column(column, justify="right")
    for label, figures in results["affinity"].items():
        hits = figures["hits"]
        kept = figures.get("on_most_used_replica")
        affinity.add_row(
            "serve --replicas 2" if label == "replicas" else label,
            str(figures["failed"]),
            f"{hits['bank']}/{hits['memory']}/{hits['disk']}",
            f"{figures['bank_hit_rate']:.2f}",
            f"{kept:.2f}" if kept is not None else "-",
        )
    console.print(latency, affinity)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "replicas.json").write_text(json.dumps(results, indent=1))
    with console.capture() as captured:
        console.print(latency, affinity)
    date = time.strftime("%Y-%m-%d")
    (RESULTS / "replicas.md").write_text(f"# bench_replicas.py ({date}, 2-core CPU)\n\n```\n{captured.get()}```\n")


if __name__ == "__main__":
    main()
