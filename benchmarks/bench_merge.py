"""`expert-hub merge` against the Python users wrote before it: peak memory and time, side by side in one run.

The base: a qwen3_moe with DeepSeek-V2-Lite-sized routed experts (bfloat16, 2048 x 1408, 64 per layer; about 1.1 GiB
of experts per layer), saved in shards of `--shard-gb`. The task: `--experts` experts in every layer, an adapter smaller
than one shard, as ESFT's are. Each way runs in its own process, whose peak resident memory its parent reads
(`RUSAGE_CHILDREN`), on the same files:
- merge: `expert-hub merge TASK --base BASE --out DIR`, as users run it;
- load + save: `expert_hub.load_model(base, task).save_pretrained(DIR)` then `sync`, the whole model in memory;
- copy: `cp -r` of the base then `sync`, the floor any full checkpoint written to this disk costs;
- process baseline: `expert-hub merge` on a tiny base, what the process costs before any shard (imports).
The ways alternate, `--repeats` rounds; medians and ranges. The outputs of merge and load + save are then compared
tensor by tensor. Run: `.venv/bin/python benchmarks/bench_merge.py [--layers 4 --repeats 3]` (about 6 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from expert_hub import ExpertAdapter, ExpertSelection
from expert_hub.models import describe_model
from expert_hub.testing import build_tiny_model, byte_tokenizer, tiny_config

RESULTS = Path(__file__).parent / "results"
SHAPE = dict(hidden_size=2048, moe_intermediate_size=1408, num_experts=64, intermediate_size=1408, head_dim=128)
PROBE = (
    "import resource, subprocess, sys, time; start = time.perf_counter(); "
    "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
    "print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
)
LOAD_AND_SAVE = (
    "import os, sys, expert_hub; expert_hub.load_model(sys.argv[1], sys.argv[2]).save_pretrained(sys.argv[3]); "
    "os.sync()"
)
COPY, MERGE, LOAD_SAVE = "copy (cp -r + sync)", "expert-hub merge", "load_model + save_pretrained + sync"
BASELINE = "process baseline (merge on a tiny base)"


def _base(directory: Path, layers: int, shard_gb: float) -> Path:
    torch.manual_seed(0)
    config = tiny_config("qwen3_moe", num_hidden_layers=layers, **SHAPE)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=f"{int(shard_gb * 1000)}MB")
    byte_tokenizer().save_pretrained(directory)
    return directory


def _adapter(base: Path, directory: Path, experts: int) -> Path:
    """`experts` experts in every MoE layer (spread over the layer's ids), random, in the base's dtype."""
    model = describe_model(str(base))
    step = max(1, model.num_experts // experts)
    selection = ExpertSelection(
        {layer: list(range(0, model.num_experts, step))[:experts] for layer in model.moe_layers}
    )
    dtype = getattr(torch, json.loads((base / "config.json").read_text()).get("dtype", "float32"))
    generator = torch.Generator().manual_seed(1)
    tensors = {
        f"model.layers.{layer}.mlp.experts.{expert}.{name}": (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        for layer, expert in selection.pairs
        for name, shape in model.expert_shapes.items()
    }
    return ExpertAdapter(selection, tensors).save(directory)


def _measure(command: list[str]) -> tuple[float, int]:
    done = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True, check=True)
    seconds, peak = done.stdout.split()
    return float(seconds), int(peak)


def _same_weights(first: Path, second: Path) -> bool:
    """Every tensor of two checkpoints equal, read one at a time (their shards may be cut differently)."""

    def keys(directory: Path) -> dict[str, Path]:
        found = {}
        for file in directory.glob("*.safetensors"):
            with safe_open(file, "pt") as handle:
                found |= dict.fromkeys(handle.keys(), file)
        return found

    left, right = keys(first), keys(second)
    if left.keys() != right.keys():
        return False
    for key in sorted(left):
        with safe_open(left[key], "pt") as a, safe_open(right[key], "pt") as b:
            if not torch.equal(a.get_tensor(key), b.get_tensor(key)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--experts", type=int, default=8, help="experts per layer in the task")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the ways alternate within each")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        root = Path(scratch)
        console.print("building the bases ...")
        base = _base(root / "base", args.layers, args.shard_gb)
        adapter = _adapter(base, root / "law", args.experts)
        tiny = build_tiny_model("qwen3_moe", root / "tiny")
        tiny_adapter = _adapter(tiny, root / "tiny-law", 2)
        shards = sorted(base.glob("*.safetensors"))
        largest, total = max(p.stat().st_size for p in shards), sum(p.stat().st_size for p in shards)
        adapter_bytes = (adapter / "experts.safetensors").stat().st_size
        expert_hub = str(Path(sys.executable).with_name("expert-hub"))
        ways = {
            COPY: ["sh", "-c", f"cp -r {base} {root / 'out'} && sync"],
            MERGE: [expert_hub, "merge", str(adapter), "--base", str(base), "--out", str(root / "out")],
            LOAD_SAVE: [sys.executable, "-c", LOAD_AND_SAVE, str(base), str(adapter), str(root / "out")],
            BASELINE: [expert_hub, "merge", str(tiny_adapter), "--base", str(tiny), "--out", str(root / "out")],
        }
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in ways}
        for round_ in range(args.repeats):
            for name in list(ways)[round_ % len(ways) :] + list(ways)[: round_ % len(ways)]:
                console.print(f"round {round_ + 1}: {name} ...")
                shutil.rmtree(root / "out", ignore_errors=True)
                subprocess.run(["sync"], check=True)
                runs[name].append(_measure(ways[name]))
                if name in (MERGE, LOAD_SAVE) and not (root / name.split()[0]).exists():  # kept for the comparison
                    os.replace(root / "out", root / name.split()[0])
        identical = _same_weights(root / "expert-hub", root / "load_model")
    rows = {
        name: (statistics.median(s for s, _ in done), [s for s, _ in done], max(p for _, p in done))
        for name, done in runs.items()
    }
    baseline = rows[BASELINE][2]
    gib = 2**30
    title = (
        f"merge: {len(shards)} shards, {total / gib:.2f} GiB; largest {largest / gib:.2f} GiB; task "
        f"{adapter_bytes / gib:.2f} GiB"
    )
    header = ("way", "wall s (median)", "range", "peak RSS GiB", "(peak - process baseline) / largest shard")
    lines = []
    for name, (median, seconds, peak) in rows.items():
        above = "-" if name in (COPY, BASELINE) else f"{(peak - baseline) / largest:.2f}"
        lines.append((name, f"{median:.1f}", f"{min(seconds):.1f}-{max(seconds):.1f}", f"{peak / gib:.2f}", above))
    table = Table(title=title)
    for column in header:
        table.add_column(column)
    for line in lines:
        table.add_row(*line)
    console.print(table)
    console.print(f"merge and load + save wrote identical weights: {identical}")
    RESULTS.mkdir(exist_ok=True)
    record = {
        "shards": len(shards),
        "base_bytes": total,
        "largest_shard_bytes": largest,
        "adapter_bytes": adapter_bytes,
        "ways": {name: {"seconds": seconds, "peak_rss_bytes": peak} for name, (_, seconds, peak) in rows.items()},
        "identical_weights": identical,
    }
    (RESULTS / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    markdown = [
        "# expert-hub merge: peak memory and time",
        "",
        f"`benchmarks/bench_merge.py --layers {args.layers} --shard-gb {args.shard_gb} --experts {args.experts} "
        f"--repeats {args.repeats}` on a 2-core CPU box. Base: qwen3_moe with DeepSeek-V2-Lite-sized experts, "
        f"bfloat16, {len(shards)} shards, {total / gib:.2f} GiB (largest {largest / gib:.2f} GiB); task: "
        f"{args.experts} experts per layer, {adapter_bytes / gib:.2f} GiB. Every way ends with its output on disk "
        "(`sync`, or merge's own fsyncs); the process baseline is `expert-hub merge` on a tiny base.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(line) + " |" for line in lines),
        "",
        f"Identical weights from merge and from load + save: {identical}.",
    ]
    (RESULTS / "merge.md").write_text("\n".join(markdown) + "\n")


if __name__ == "__main__":
    main()
