"""Registry speed against what any import or load must cost, and lookups among 1,000 entries.

An import has to read, hash and durably write each byte once; a load with verification has to read and hash each byte
once. So on an adapter of about 1 GiB of DeepSeek-V2-Lite-sized experts (bfloat16, 2048 x 1408, 3 tensors each), in
one run on the same disk, this times the two bounds
- durable copy: every file copied (`shutil.copyfile`) and fsynced, then the directory;
- sha256 pass: one `hashlib.sha256` pass over the files, read in 8 MiB chunks (what `sha256sum` does);
and `Registry.register` (into an empty registry each time) and `Registry.load` (verify + read the tensors), each with
the page cache warm (the files just read) and cold (their pages evicted first; the output says how).
Goals: import <= 1.3x max(durable copy, sha256 pass), load <= 1.2x the sha256 pass.
A plain copy (`cp`: the bytes may still sit in the page cache, never reaching the disk) is shown for reference only;
ratios to it swing with the machine. The operations alternate, so all share the machine's state; medians of
`--repeats` (the range shows how much runs differ: a virtual disk can write fresh blocks far slower than reused
ones). Run: `.venv/bin/python benchmarks/bench_registry.py [--gib 1.0 --repeats 5]`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from expert_hub import AdapterMetadata, ExpertAdapter, ExpertSelection
from expert_hub.io import fsync_path
from expert_hub.registry import Registry

HIDDEN, INTERMEDIATE = 2048, 1408  # DeepSeek-V2-Lite's routed experts
CHUNK = 8 * 2**20
COPY, SHA, PLAIN = "durable copy (copy + fsync)", "sha256 pass", "plain copy (reference)"
IMPORT, LOAD = "import (Registry.register)", "load (verify + read tensors)"
GOALS = {IMPORT: ("max(durable copy, sha256 pass)", 1.3), LOAD: ("sha256 pass", 1.2)}  # bound, ratio
EVICTION = "posix_fadvise(POSIX_FADV_DONTNEED) after fsync, on the files read"


def _adapter(num_experts: int, task: str) -> ExpertAdapter:
    selection = ExpertSelection(
        {1 + e // 6: [e % 6] for e in range(0, num_experts, 6)}
        if num_experts < 6
        else {layer: list(range(6)) for layer in range(1, 1 + num_experts // 6)}
    )
    tensors = {}
    for layer, expert in selection.pairs:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        tensors[f"{prefix}.gate_proj.weight"] = torch.randn(INTERMEDIATE, HIDDEN, dtype=torch.bfloat16)
        tensors[f"{prefix}.up_proj.weight"] = torch.randn(INTERMEDIATE, HIDDEN, dtype=torch.bfloat16)
        tensors[f"{prefix}.down_proj.weight"] = torch.randn(HIDDEN, INTERMEDIATE, dtype=torch.bfloat16)
    return ExpertAdapter(selection, tensors, AdapterMetadata(task=task, base_model="deepseek-ai/ESFT-vanilla-lite"))


def _timed(function: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (only clean pages go, hence the fsync), touching nothing else."""
    for file in files:
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _read(files: list[Path]) -> None:
    for file in files:
        with file.open("rb") as reader:
            while reader.read(CHUNK):
                pass


def _sha256_pass(files: list[Path]) -> None:
    for file in files:
        digest = hashlib.sha256()
        with file.open("rb") as reader:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)


def _copy(files: list[Path], target: Path, durable: bool) -> None:
    target.mkdir()
    for file in files:
        shutil.copyfile(file, target / file.name)
        if durable:
            fsync_path(target / file.name)
    if durable:
        fsync_path(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="adapter size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--entries", type=int, default=1000)
    args = parser.parse_args()
    console = Console(width=120)
    expert_bytes = 3 * HIDDEN * INTERMEDIATE * 2
    num_experts = max(6, round(args.gib * 2**30 / expert_bytes) // 6 * 6)

    with tempfile.TemporaryDirectory(dir=Path.home()) as directory:
        root = Path(directory)
        source = _adapter(num_experts, "law").save(root / "adapter")
        sources = sorted(source.iterdir())
        size = sum(p.stat().st_size for p in sources)
        stored = Registry(root / "stored")
        objects = sorted((stored.object_path(stored.register(source))).iterdir())
        operations: dict[str, tuple[list[Path], Callable[[Path], object]]] = {  # the files read, and the run
            COPY: (sources, lambda out: _copy(sources, out, durable=True)),
            SHA: (sources, lambda out: _sha256_pass(sources)),
            IMPORT: (sources, lambda out: Registry(out).register(source)),
            LOAD: (objects, lambda out: stored.load("law")),
            PLAIN: (sources, lambda out: _copy(sources, out, durable=False)),
        }
        times: dict[tuple[str, str], list[float]] = {}
        for repeat in range(args.repeats):
            for cache in ("warm", "cold"):
                for name, (files, operation) in operations.items():
                    (_read if cache == "warm" else _evict)(files)
                    out = root / f"out-{repeat}"  # where a copy or registry goes; removed after timing
                    start = time.perf_counter()
                    operation(out)
                    times.setdefault((name, cache), []).append(time.perf_counter() - start)
                    shutil.rmtree(out, ignore_errors=True)
        median = {key: statistics.median(values) for key, values in times.items()}

        table = Table(title=f"Registry on an adapter of {num_experts} experts, {size / 2**30:.2f} GiB")
        for column in ("operation", "cache", "median s", "range s", "GiB/s", "x bound", "goal"):
            table.add_column(column, justify="left" if column in ("operation", "cache") else "right")
        ratios = []
        for cache in ("warm", "cold"):
            bounds = {IMPORT: max(median[COPY, cache], median[SHA, cache]), LOAD: median[SHA, cache]}
            for name in operations:
                seconds = median[name, cache]
                ratio = f"{seconds / bounds[name]:.2f}" if name in bounds else ""
                goal = f"<= {GOALS[name][1]}" if name in GOALS else ""
                spread = f"{min(times[name, cache]):.2f}-{max(times[name, cache]):.2f}"
                table.add_row(name, cache, f"{seconds:.3f}", spread, f"{size / 2**30 / seconds:.2f}", ratio, goal)
                if name in GOALS:
                    ratios.append(f"{name} / {GOALS[name][0]}, {cache} cache: {ratio} (goal <= {GOALS[name][1]})")
        console.print(table)
        console.print(f"cold: the files' pages evicted with {EVICTION}; warm: the files read just before")
        console.print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, medians of {args.repeats} runs")
        console.print("\n".join(ratios))

        small = _adapter(1, "tiny").save(root / "small")
        lookups = Registry(root / "many")
        for i in range(args.entries):
            lookups.register(small, task=f"task-{i}")
        resolve = _timed(lambda: lookups.resolve("task-123"), repeats=20)
        listing = _timed(lambda: lookups.entries(), repeats=20)
        console.print(f"{args.entries} entries: resolve {resolve * 1e3:.2f} ms, list {listing * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
