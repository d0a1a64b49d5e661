"""Starting vLLM's engine for `expert-hub serve`: its arguments, its memory on CPU, and errors in one line.

vLLM itself is reached through `vllm_contract`.
"""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path

from expert_hub.errors import InvalidInputError
from expert_hub.io import first_line

from . import vllm_contract as vllm

_GiB = 2**30


def cpu_rotary_workaround(vllm_argv: list[str]) -> list[str]:
    """On CPU, run rotary embeddings in PyTorch rather than vLLM's C++ kernel.

    vLLM 0.32's CPU rotary kernel rotates queries wrongly in GPT-J (interleaved) style when the query has more heads
    than the key and the batch has more than one token, which is DeepSeek's MLA: every request's tokens then depend
    on what else shares its batch (with `--enforce-eager`; compiled runs default to the PyTorch path). A
    `--compilation-config` given by the user wins.
    """
    if not vllm.is_cpu() or any(a.startswith(("--compilation-config", "-cc")) for a in vllm_argv):
        return []
    return ["--compilation-config", json.dumps({"custom_ops": ["-rotary_embedding"]})]


def cpu_float32_mla_backend(base: str, vllm_argv: list[str]) -> list[str]:
    """On CPU, DeepSeek's MLA attention in float32 runs on vLLM's reference MLA backend (`CPU_MLA`).

    vLLM 0.32 picks its AMX MLA backend wherever the CPU has AMX tiles, and that backend refuses float32 weights
    when the engine starts ("expect weight to be bfloat16, float16, ..."), so `serve --dtype float32` of a DeepSeek
    base failed on such machines. An `--attention-backend` given by the user wins.
    """
    if not vllm.is_cpu() or any(a.startswith("--attention-backend") for a in vllm_argv):
        return []
    dtypes = [value for flag, value in pairwise(vllm_argv) if flag == "--dtype"]  # `serve` always gives one
    return ["--attention-backend", "CPU_MLA"] if dtypes[-1:] in (["float32"], ["float"]) and uses_mla(base) else []


def uses_mla(base: str) -> bool:
    """Whether vLLM runs the model's attention as MLA (DeepSeek-V2/V3's latent KV)."""
    from expert_hub.models import load_config

    return getattr(load_config(base), "kv_lora_rank", None) is not None


def kv_cache_bytes(config, free_bytes: int, given: int | None = None) -> int:
    """KV cache memory on CPU: `given` (`--kv-cache-gb`) if it holds two `max_model_len` sequences and fits in
    `free_bytes`; by default what `max_num_seqs` such sequences take, at most half of `free_bytes` and at least two.

    vLLM's own default on CPU is 92% of the machine's memory whatever the model needs, so any other process that
    holds memory gets the server killed; and a cache too small or too large fails inside the engine process with a
    traceback. Both are decided here instead, with one line that says what to change.
    """
    shape = vllm.kv_cache_shape(config)
    sequence = shape.bytes_per_token * shape.max_model_len
    if given is not None:
        if given < 2 * sequence:
            raise InvalidInputError(
                f"a KV cache of {_size(given)} holds less than two {shape.max_model_len}-token "
                f"sequences ({_size(2 * sequence)}): give a larger --kv-cache-gb or a smaller "
                "--max-model-len"
            )
        if given > free_bytes:
            raise InvalidInputError(
                f"a KV cache of {_size(given)} is more than the {_size(free_bytes)} of memory free "
                "besides the weights: give a smaller --kv-cache-gb"
            )
        return given
    if 2 * sequence > free_bytes:
        raise InvalidInputError(
            f"a {shape.max_model_len}-token sequence needs {_size(sequence)} of KV cache and only {_size(free_bytes)} "
            "of memory is free besides the weights: give a smaller --max-model-len"
        )
    return max(2 * sequence, min(sequence * shape.max_num_seqs, free_bytes // 2))


def _size(nbytes: int) -> str:
    return f"{nbytes / _GiB:.2f} GiB" if nbytes >= _GiB else f"{nbytes / 2**20:.1f} MiB"


def free_device_memory() -> int:
    """Free memory of the device the model will run on, read without starting CUDA in this process (the engine's
    own processes own the GPUs): NVML's least free memory over the GPUs, or the available RAM on CPU."""
    import psutil

    if vllm.is_cpu():
        return psutil.virtual_memory().available
    import pynvml  # nvidia-ml-py, a dependency of vLLM's CUDA builds

    pynvml.nvmlInit()
    try:
        devices = range(pynvml.nvmlDeviceGetCount())
        return min(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free for i in devices)
    finally:
        pynvml.nvmlShutdown()


def _free_memory_besides_weights(model_path: str) -> int:
    """Available memory now, less the checkpoint's size (a local directory's; Hub models count as nothing)."""
    import psutil

    weights = sum(file.stat().st_size for file in Path(model_path).glob("*.safetensors"))
    return psutil.virtual_memory().available - weights


def _vllm_message(error: Exception) -> str:
    """vLLM's configuration errors, pydantic's included, as one line."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError) and error.errors():
        return error.errors()[0]["msg"].removeprefix("Value error, ")
    return first_line(error)


def _refuse_parallelism(config) -> None:
    """Tensor parallelism only: each rank's bank holds its shard of every task expert (see `worker.py`)."""
    options = {option: value for option, value in vllm.parallel_options(config).items() if value is True or value > 1}
    if "--enable-expert-parallel" in options:
        raise InvalidInputError(
            "--enable-expert-parallel is not supported: vLLM's expert map places the base experts alone on ranks, "
            "so a task's expert rows would have no rank to live on; serve without it (--tensor-parallel-size "
            "shards every expert, task experts included, across the devices)"
        )
    if "--data-parallel-size" in options:
        raise InvalidInputError(
            f"--data-parallel-size {options['--data-parallel-size']} is not supported yet: its replicas route "
            "each other's tokens through their MoE layers, and the bank tags only a replica's own tokens with their "
            "tasks; use --tensor-parallel-size, or --replicas N (one server per device, on Ray Serve)"
        )
    if "--pipeline-parallel-size" in options:
        raise InvalidInputError(
            f"--pipeline-parallel-size {options['--pipeline-parallel-size']} is not supported yet: "
            "use --tensor-parallel-size"
        )


def cpu_thread_binding(workers: int) -> str | None:
    """On CPU, the cores for each of `workers` worker processes (`VLLM_CPU_OMP_THREADS_BIND`), when vLLM's own
    default cannot place them: None where it can, or where the user chose a binding.

    vLLM binds each worker of a tensor-parallel group to a NUMA node of its own and refuses to start with fewer
    nodes than workers, the usual case on one socket or in a container. The allowed CPUs are then split evenly.
    """
    if workers < 2 or not vllm.is_cpu() or not vllm.cpu_thread_binding_is_default():
        return None
    nodes, cpus = vllm.cpu_layout()
    if nodes >= workers:
        return None
    if len(cpus) < workers:
        raise InvalidInputError(
            f"--tensor-parallel-size {workers} needs a CPU per worker and {len(cpus)} are available: "
            "give a smaller --tensor-parallel-size"
        )
    share = len(cpus) // workers
    return "|".join(",".join(map(str, cpus[rank * share : (rank + 1) * share])) for rank in range(workers))


def checked_engine_config(args):
    """vLLM's engine arguments and configuration for the parsed server `args`; vLLM's refusals, and parallelism
    `serve` does not support, as one `InvalidInputError` line."""
    from pydantic import ValidationError

    engine_args = vllm.engine_args(args)
    try:
        config = vllm.engine_config(engine_args)
    except (ValueError, TypeError, ValidationError) as error:
        raise InvalidInputError(f"vLLM refused the server options: {_vllm_message(error)}") from error
    _refuse_parallelism(config)
    return engine_args, config


@asynccontextmanager
async def start_engine(args):
    """vLLM's async engine client for the parsed server `args`; configuration and start-up failures become one
    `InvalidInputError` line (the engine process has logged the details above it)."""
    engine_args, config = checked_engine_config(args)
    binding = cpu_thread_binding(vllm.parallel_options(config)["--tensor-parallel-size"])
    if binding:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding  # read by the engine process vLLM spawns next
    if vllm.is_cpu() and vllm.memory_utilization_is_default(engine_args):
        vllm.set_kv_cache_bytes(
            engine_args,
            kv_cache_bytes(config, _free_memory_besides_weights(args.model), vllm.given_kv_cache_bytes(config)),
        )
    started = False
    try:
        async with vllm.engine_client(engine_args) as engine:
            started = True
            yield engine
    except Exception as error:
        if started:
            raise
        raise InvalidInputError(
            f"the vLLM engine did not start ({first_line(error)}): the engine's log above says why"
        ) from error
