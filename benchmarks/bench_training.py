"""The paper's efficiency comparison, measured side by side: ESFT-Token, ESFT-Gate, full fine-tuning, LoRA.

For each method, on the same random-weight model (a scaled-down DeepSeek-V2-Lite: 64 routed experts, top-6,
shared experts) and the same task data, a fresh process runs the real training loop and reports trainable
parameters, median step time, peak memory, optimizer-state bytes and artifact bytes. Goals: ESFT step time
<= 0.6x full fine-tuning, ESFT trainable state (weights + grads + optimizer) <= 0.25x full, artifact bytes =
the selected experts' bytes plus small metadata.
Run: `.venv/bin/python benchmarks/bench_training.py [--steps 6 --seq-len 512]`. On a GPU (`benchmarks/gpu/run.sh`):
`--shape v2-lite --layers 8 --dtype bfloat16 --methods esft-token,esft-gate,lora`, the model built on the GPU.
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
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "esft" / "datasets" / "train" / "law.jsonl"
METHODS = ("esft-token", "esft-gate", "full", "lora")
SHAPES = {
    "small": dict(
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_experts_per_tok=6,
        n_routed_experts=64,
        moe_intermediate_size=256,
        intermediate_size=1024,
        vocab_size=320,
    ),
    # DeepSeek-V2-Lite's config.json (16B parameters, 2.4B active), its positions cut to the 4096 it was trained on
    # (no YaRN): a GPU's worth of work per step, with the byte tokenizer using 259 of its 102400 ids
    "v2-lite": dict(
        hidden_size=2048,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        vocab_size=102400,
        max_position_embeddings=4096,
        initializer_range=0.02,
    ),
}


def worker(method: str, base: str, out: str, data: str, args) -> dict:
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
        data=data,
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
        dtype=args.dtype,
    )
    result = train(config, on_step=on_step, on_status=on_status)
    checkpoint = next((Path(out) / "checkpoints").glob("step-*"))
    trainable_bytes = (checkpoint / "trainable.safetensors").stat().st_size
    optimizer_bytes = (checkpoint / "optimizer.safetensors").stat().st_size
    artifact_files = [p for p in result.artifact.rglob("*") if p.is_file()]
    weight_files = [p for p in artifact_files if p.suffix == ".safetensors"]
    return {
        "method": method,
        "trainable_parameters": trainable_bytes // 4,  # float32 masters in any --dtype; the header is negligible
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


def build_model(shape: dict, dtype: torch.dtype, device: torch.device):
    """A random deepseek_v2 model of `shape`, made on `device` in `dtype` (seed 0): on a GPU a 16B-parameter shape
    takes seconds, where the CPU would take minutes and float32 twice the bytes. On the CPU in float32 these are
    `build_tiny_model`'s weights."""
    from expert_hub.testing import tiny_config

    torch.manual_seed(0)
    with device:
        return AutoModelForCausalLM.from_config(tiny_config("deepseek_v2", **shape), dtype=dtype)


def _build_base(path: Path, shape: dict, dtype: torch.dtype) -> Path:
    from expert_hub.testing import byte_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where train() will put it
    build_model(shape, dtype, device).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    if device.type == "cuda":  # the training processes get the whole GPU
        torch.cuda.empty_cache()
    return path


def _task_data(directory: Path) -> Path:
    """The paper's law training set where ../shared holds it; else the built-in law task's, which needs nothing
    outside the repo (a GPU machine gets only the repo)."""
    if DATA.is_file():
        return DATA
    from expert_hub.tasks import export

    return export("law", directory / "law-data")["train"]


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
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS) + " (default: all)"
    )
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "BASE", "OUT", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {', '.join(sorted(unknown))}; use some of {', '.join(METHODS)}")
    shape = SHAPES[args.shape] | ({"num_hidden_layers": args.layers} if args.layers else {})

    console = Console(width=150)
    with tempfile.TemporaryDirectory() as directory:
        base = _build_base(Path(directory) / "base", shape, getattr(torch, args.dtype))
        data = _task_data(Path(directory))
        console.print(f"[dim]training data: {data}[/dim]")
        rows = {}
        for method in methods:
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
                "--dtype",
                args.dtype,
                "--worker",
                method,
                str(base),
                str(Path(directory) / method),
                str(data),
            ]
            finished = subprocess.run(command, capture_output=True, text=True)
            if finished.returncode:  # the worker's own error, not only its exit status
                sys.exit(f"training {method} failed:\n{finished.stderr[-3000:]}")
            rows[method] = json.loads(finished.stdout.strip().splitlines()[-1])
        model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))

    # without full fine-tuning (a GPU run skips it: its float32 checkpoint outgrows the disk) no ratio to it
    full = rows.get("full")

    def versus_full(row: dict, key: str, digits: int) -> str:
        return f"{row[key] / full[key]:.{digits}f}" if full else "-"

    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    table = Table(
        title=f"Training efficiency: deepseek_v2-shaped ({args.shape}, {shape['num_hidden_layers']} layers), "
        f"{model_bytes / 2**20:.0f} MiB of {args.dtype} weights, "
        f"{args.steps} steps x {args.grad_accumulation} x {args.seq_len} tokens, {device}"
    )
    columns = ["method", "experts", "trainable params", "step s", "x full", "trainable state MiB", "x full"]
    columns += ["peak RSS MiB", *(["peak GPU MiB"] if on_gpu else []), "artifact MiB", "x model"]
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, row in rows.items():
        peak_gpu = [f"{row['peak_cuda_bytes'] / 2**20:.0f}"] if on_gpu else []
        table.add_row(
            method,
            str(row["experts"] or "-"),
            f"{row['trainable_parameters']:,}",
            f"{row['step_seconds']:.2f}",
            versus_full(row, "step_seconds", 2),
            f"{row['trainable_state_bytes'] / 2**20:.1f}",
            versus_full(row, "trainable_state_bytes", 3),
            f"{row['peak_rss_bytes'] / 2**20:.0f}",
            *peak_gpu,
            f"{row['artifact_bytes'] / 2**20:.2f}",
            f"{row['artifact_bytes'] / model_bytes:.3f}",
        )
    console.print(table)
    for method in ("esft-token", "esft-gate"):
        if method not in rows:
            continue
        row = rows[method]
        metadata = row["artifact_bytes"] - row["artifact_weight_bytes"]
        goals = (
            f"step time {versus_full(row, 'step_seconds', 2)}x full (goal <= 0.6), trainable state "
            f"{versus_full(row, 'trainable_state_bytes', 3)}x full (goal <= 0.25), "
            if full
            else ""
        )
        console.print(
            f"{method}: {goals}artifact = {row['artifact_weight_bytes'] / 2**20:.2f} MiB of expert weights "
            f"(trainable rows: {row['trainable_bytes'] / 2**20:.2f} MiB) + {metadata / 1024:.1f} KiB metadata"
        )


if __name__ == "__main__":
    main()
