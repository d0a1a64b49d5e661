"""Registry speed: importing and loading a realistic adapter vs copying its files, and lookups among 1,000 entries.

Builds an adapter of about 1 GiB of DeepSeek-V2-Lite-sized experts (bfloat16, 2048 x 1408, 3 tensors each), then
times, in one run and on the same disk: a raw copy of its files (`shutil.copyfile`), `Registry.register` (copy +
sha256 + atomic publish + locked index update), and `Registry.load` (verify every sha256 + read the tensors).
Goal: import / raw copy <= 1.5. Then registers 1,000 small entries and times `resolve` and `entries`.
Run: `.venv/bin/python benchmarks/bench_registry.py [--gib 1.0]`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from expert_hub import AdapterMetadata, ExpertAdapter, ExpertSelection
from expert_hub.registry import Registry

HIDDEN, INTERMEDIATE = 2048, 1408  # DeepSeek-V2-Lite's routed experts


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


def _timed(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="adapter size")
    parser.add_argument("--entries", type=int, default=1000)
    args = parser.parse_args()
    console = Console()
    expert_bytes = 3 * HIDDEN * INTERMEDIATE * 2
    num_experts = max(6, round(args.gib * 2**30 / expert_bytes) // 6 * 6)

    with tempfile.TemporaryDirectory(dir=Path.home()) as directory:
        root = Path(directory)
        source = _adapter(num_experts, "law").save(root / "adapter")
        size = sum(p.stat().st_size for p in source.iterdir())
        registry = Registry(root / "registry")
        copies = iter(range(100))

        def raw_copy() -> None:
            target = root / f"copy-{next(copies)}"
            target.mkdir()
            for file in source.iterdir():
                shutil.copyfile(file, target / file.name)

        raw = _timed(raw_copy)
        imported = _timed(lambda: registry.register(source))
        loaded = _timed(lambda: registry.load("law"))
        table = Table(title=f"Registry on an adapter of {num_experts} experts, {size / 2**30:.2f} GiB")
        table.add_column("operation")
        table.add_column("median s", justify="right")
        table.add_column("GiB/s", justify="right")
        table.add_column("x raw copy", justify="right")
        for name, seconds in (
            ("raw file copy", raw),
            ("import (copy + sha256 + publish)", imported),
            ("load (verify sha256 + read tensors)", loaded),
        ):
            table.add_row(name, f"{seconds:.3f}", f"{size / 2**30 / seconds:.2f}", f"{seconds / raw:.2f}")
        console.print(table)
        console.print(f"import / raw copy: {imported / raw:.2f} (goal <= 1.5)")

        small = _adapter(1, "tiny").save(root / "small")
        lookups = Registry(root / "many")
        for i in range(args.entries):
            lookups.register(small, task=f"task-{i % 250}")
        resolve = _timed(lambda: lookups.resolve("task-123"), repeats=20)
        listing = _timed(lambda: lookups.entries(), repeats=20)
        console.print(f"{args.entries} entries: resolve {resolve * 1e3:.2f} ms, list {listing * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
