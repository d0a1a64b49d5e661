"""The paper's efficiency comparison, measured side by side: ESFT-Token, ESFT-Gate, full fine-tuning, LoRA.

For each method, on the same random-weight model (a scaled-down DeepSeek-V2-Lite: 64 routed experts, top-6,
shared experts) and the same task data, a fresh process runs the real training loop and reports trainable
parameters, median step time, peak memory, optimizer-state bytes and artifact bytes. Goals: ESFT step time
<= 0.6x full fine-tuning, ESFT trainable state (weights + grads + optimizer) <= 0.25x full, artifact bytes =
the selected experts' bytes plus small metadata.
Run: `.venv/bin/python benchmarks/bench_training.py [--steps 6 --seq-len 512]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "esft" / "datasets" / "train" / "law.jsonl"
METHODS = ("esft-token", "esft-gate", "full", "lora")
SHAPE = dict(
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    num_experts_per_tok=6,
    n_routed_experts=64,
    moe_intermediate_size=256,
    intermediate_size=1024,
    vocab_size=320,
)


def worker(method: str, base: str, out: str, args) -> dict:
    """One method in this (fresh) process: train, then measure what it left behind."""
    from expert_hub.training import TrainingConfig, train

    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(report) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    def on_status(message: str) -> None:
        last[0] = time.perf_counter()

    config = TrainingConfig(
        task="law",
        base=base,
        data=str(DATA),
        out=out,
        method=method,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=1,
        grad_accumulation=args.grad_accumulation,
        score_tokens=args.score_tokens,
        save_every=args.steps,
        eval_every=args.steps,
        eval_fraction=0.0,
        gradient_checkpointing=True,
        dtype="float32",
    )
    result = train(config, on_step=on_step, on_status=on_status)
    checkpoint = next((Path(out) / "checkpoints").glob("step-*"))
    trainable_bytes = (checkpoint / "trainable.safetensors").stat().st_size
    optimizer_bytes = (checkpoint / "optimizer.safetensors").stat().st_size
    artifact_files = [p for p in result.artifact.rglob("*") if p.is_file()]
    weight_files = [p for p in artifact_files if p.suffix == ".safetensors"]
    return {
        "method": method,
        "trainable_parameters": trainable_bytes // 4,  # float32 tensors; the file's header is negligible
        "trainable_bytes": trainable_bytes,
        "optimizer_bytes": optimizer_bytes,
        # weights + gradients + AdamW's two moments, all float32 here
        "trainable_state_bytes": 2 * trainable_bytes + optimizer_bytes,
        "step_seconds": statistics.median(times[1:]),  # the first step pays one-off warm-up costs
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "artifact_bytes": sum(p.stat().st_size for p in artifact_files),
        "artifact_weight_bytes": sum(p.stat().st_size for p in weight_files),
        "experts": _selected_experts(result.artifact),
    }


def _selected_experts(artifact: Path) -> int | None:
    config = artifact / "expert_cfg.json"
    if not config.is_file():
        return None
    return sum(len(ids) for ids in json.loads(config.read_text())["experts"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--grad-accumulation", type=int, default=2)
    parser.add_argument("--score-tokens", type=int, default=8192)
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "BASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    from expert_hub.testing import build_tiny_model

    console = Console(width=150)
    with tempfile.TemporaryDirectory() as directory:
        base = build_tiny_model("deepseek_v2", Path(directory) / "base", **SHAPE)
        rows = {}
        for method in METHODS:
            console.print(f"[dim]training {method} ...[/dim]")
            command = [
                sys.executable,
                __file__,
                "--steps",
                str(args.steps),
                "--seq-len",
                str(args.seq_len),
                "--grad-accumulation",
                str(args.grad_accumulation),
                "--score-tokens",
                str(args.score_tokens),
                "--worker",
                method,
                str(base),
                str(Path(directory) / method),
            ]
            finished = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[method] = json.loads(finished.stdout.strip().splitlines()[-1])
        model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))

    full = rows["full"]
    table = Table(
        title=f"Training efficiency: deepseek_v2-shaped, {model_bytes / 2**20:.0f} MiB of float32 weights, "
        f"{args.steps} steps x {args.grad_accumulation} x {args.seq_len} tokens, CPU"
    )
    for column in (
        "method",
        "experts",
        "trainable params",
        "step s",
        "x full",
        "trainable state MiB",
        "x full",
        "peak RSS MiB",
        "artifact MiB",
        "x model",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, row in rows.items():
        table.add_row(
            method,
            str(row["experts"] or "-"),
            f"{row['trainable_parameters']:,}",
            f"{row['step_seconds']:.2f}",
            f"{row['step_seconds'] / full['step_seconds']:.2f}",
            f"{row['trainable_state_bytes'] / 2**20:.1f}",
            f"{row['trainable_state_bytes'] / full['trainable_state_bytes']:.3f}",
            f"{row['peak_rss_bytes'] / 2**20:.0f}",
            f"{row['artifact_bytes'] / 2**20:.2f}",
            f"{row['artifact_bytes'] / model_bytes:.3f}",
        )
    console.print(table)
    for method in ("esft-token", "esft-gate"):
        row = rows[method]
        metadata = row["artifact_bytes"] - row["artifact_weight_bytes"]
        console.print(
            f"{method}: step time {row['step_seconds'] / full['step_seconds']:.2f}x full (goal <= 0.6), "
            f"trainable state {row['trainable_state_bytes'] / full['trainable_state_bytes']:.3f}x full "
            f"(goal <= 0.25), artifact = {row['artifact_weight_bytes'] / 2**20:.2f} MiB of expert weights "
            f"(trainable rows: {row['trainable_bytes'] / 2**20:.2f} MiB) + {metadata / 1024:.1f} KiB metadata"
        )


if __name__ == "__main__":
    main()
