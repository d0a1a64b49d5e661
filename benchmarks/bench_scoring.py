"""Scoring throughput with the routing hooks vs the same forward passes without them.

Builds a random-weight model shaped like a scaled-down DeepSeek-V2-Lite (64 routed experts, top-6, shared
experts), then alternates hooked and plain runs over the same batches and reports median tokens/s of each
and their ratio (goal: >= 0.95). Run: `.venv/bin/python benchmarks/bench_scoring.py [--family qwen3_moe]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from expert_hub.data import pad
from expert_hub.models import load_base
from expert_hub.routing import score_model
from expert_hub.testing import TINY_FAMILIES, build_tiny_model

# hidden 512, 6 layers, 64 experts of width 256, top-6: small enough for a 2-core CPU, big enough that
# expert matmuls, not Python overhead, dominate a forward pass.
SHAPE = dict(
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    num_experts_per_tok=6,
    moe_intermediate_size=256,
    intermediate_size=1024,
    vocab_size=320,
)
EXPERTS = {
    "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "olmoe": "num_experts",
    "mixtral": "num_local_experts",
    "gpt_oss": "num_local_experts",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=TINY_FAMILIES, default="deepseek_v2")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    shape = SHAPE | {EXPERTS[args.family]: 64}
    if args.family == "gpt_oss":
        shape["intermediate_size"] = shape["moe_intermediate_size"]
    with tempfile.TemporaryDirectory() as directory:
        model = load_base(str(build_tiny_model(args.family, directory, **shape)), dtype=torch.float32).eval()
    # Lengths vary as real conversations do, so batches are padded and the recorder's token mask is exercised.
    lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (args.batch_size * args.batches,)).tolist()
    sequences = [torch.randint(0, 256, (length,)).tolist() for length in lengths]
    tokens = sum(lengths)

    def plain() -> None:
        with torch.inference_mode():
            for start in range(0, len(sequences), args.batch_size):
                input_ids, attention_mask = pad(sequences[start : start + args.batch_size], 0)
                model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def hooked() -> None:
        score_model(model, sequences, batch_size=args.batch_size)

    plain(), hooked()  # warm-up
    rates = {"plain forward": [], "with routing hooks": []}
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits both alike
        for name, run in (("plain forward", plain), ("with routing hooks", hooked)):
            start = time.perf_counter()
            run()
            rates[name].append(tokens / (time.perf_counter() - start))

    medians = {name: statistics.median(values) for name, values in rates.items()}
    parameters = sum(p.numel() for p in model.parameters())
    table = Table(
        title=f"Scoring throughput: {args.family}, {parameters / 1e6:.0f}M params, "
        f"{args.batch_size}x{args.seq_len} tokens/batch, {args.rounds} rounds"
    )
    table.add_column("run")
    table.add_column("median tokens/s", justify="right")
    table.add_column("min..max", justify="right")
    for name, values in rates.items():
        table.add_row(name, f"{medians[name]:,.0f}", f"{min(values):,.0f}..{max(values):,.0f}")
    console = Console()
    console.print(table)
    ratio = medians["with routing hooks"] / medians["plain forward"]
    console.print(f"ratio hooked / plain: {ratio:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
