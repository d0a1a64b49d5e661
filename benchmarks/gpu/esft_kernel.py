"""On the GPU, before any step: does the model with ESFT's two-group experts forward give the base model's logits?

The test suite checks this on the CPU with tiny models (`test_the_esft_kernel_computes_what_the_standard_kernel_does`:
bit-identical in bfloat16, close in float32). Training on a GPU runs other kernels (cuBLAS, grouped GEMMs) at a
real shape, so this repeats the check there, on the DeepSeek-V2-Lite shape that `bench_training.py --shape v2-lite`
trains, with 8 random experts selected per MoE layer, and prints one line per dtype.
Run: `python benchmarks/gpu/esft_kernel.py [--layers 8 --tokens 1024]` (`benchmarks/gpu/run.sh` does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_training, one folder up
from bench_training import SHAPES, build_model

EXPERTS_PER_LAYER = 8


def check(dtype: torch.dtype, layers: int, tokens: int, device: torch.device) -> tuple[bool, str]:
    """Whether the ESFT forward passes, and the line that says how close it came."""
    from expert_hub import ExpertSelection, moe_layers
    from expert_hub.training.methods import prepare_esft

    model = build_model(SHAPES["v2-lite"] | {"num_hidden_layers": layers}, dtype, device).eval()
    standard_kernel = model.config._experts_implementation
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 256, (2, tokens // 2), generator=generator).to(device)
    experts = {
        layer.index: sorted(torch.randperm(layer.num_experts, generator=generator)[:EXPERTS_PER_LAYER].tolist())
        for layer in moe_layers(model)
    }
    with torch.no_grad():
        standard = model(input_ids).logits.float()
        prepare_esft(model, ExpertSelection(experts))
        esft = model(input_ids).logits.float()
    del model
    difference = (esft - standard).abs().max().item()
    agreement = (esft.argmax(-1) == standard.argmax(-1)).float().mean().item()
    scale = standard.abs().max().item()
    if not esft.isfinite().all():
        passed, verdict = False, "FAIL: non-finite logits"
    elif dtype == torch.bfloat16:  # the CPU test asks for bit-identical logits in bfloat16
        passed = torch.equal(esft, standard)
        verdict = "bit-identical" if passed else "FAIL: not bit-identical, as the CPU test asks in bfloat16"
    else:  # float32 matmuls over different row groupings differ in the last bits
        passed = torch.allclose(esft, standard, rtol=1e-4, atol=1e-4 * scale)
        verdict = "close (rtol 1e-4)" if passed else "FAIL: not close"
    return passed, (
        f"{str(dtype).removeprefix('torch.')}: {verdict}; max |logit difference| {difference:.3g} (logits up to "
        f"{scale:.3g}), top-1 agreement {agreement:.2%} over {input_ids.numel()} tokens; "
        f"standard kernel {standard_kernel!r} vs 'esft'"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"ESFT kernel vs the standard one: deepseek_v2 v2-lite shape, {args.layers} layers, on {device}")
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        passed, line = check(dtype, args.layers, args.tokens, device)
        results.append(passed)
        print(line, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
