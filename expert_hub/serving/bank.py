"""The expert bank inside vLLM: extra physical expert rows per MoE layer and a per-token task remap.

ESFT changes only which weights some (layer, expert) pairs use, so one shared base model can serve many tasks in
one batch: every MoE layer holds its E base experts plus extra rows (`EXPERT_HUB_BANK_ROWS` of them, or as many as
`EXPERT_HUB_BANK_BYTES` bytes per layer hold), and a table
`remap[task_row, expert]` (row 0 = the base model) sends each token's top-k ids to the physical rows of its task.
The router is untouched; the normal expert kernel runs on the remapped ids.

A request's task reaches the worker as `SamplingParams.extra_args[TASK_ARG]`: not the task's name but its private
key, a random value only the server's front end knows and sets (`tasks.py`). A client that writes `vllm_xargs`
itself, on any endpoint, cannot name a key it has never seen, so its request runs on the base experts.

Every newly allocated KV block is zeroed before use (vLLM's own mechanism, which it enables only for Mamba and
mixed-precision caches). The CPU attention kernel reads whole blocks and weights the unused slots by zero, and zero
times NaN is NaN: without this, one request whose task produced non-finite values would leave them in blocks that
later requests of every task reuse.

This module is a `vllm.general_plugins` entry point, so vLLM imports it in every process it spawns. It changes
nothing unless one of those is set (the `expert-hub serve` command sets it), so plain vLLM in the same
environment is unaffected. The worker-side task table and loading live in `worker.py`.
"""

from __future__ import annotations

import os

import numpy as np
import torch

BANK_ROWS_ENV = "EXPERT_HUB_BANK_ROWS"  # extra physical expert rows per MoE layer, or
BANK_BYTES_ENV = "EXPERT_HUB_BANK_BYTES"  # bytes of extra rows per MoE layer, in the served dtype
MAX_TASKS_ENV = "EXPERT_HUB_MAX_TASKS"  # remap rows besides the base row
TASK_ARG = "expert_hub_task"  # the SamplingParams.extra_args key that carries a task's private key
_MAX_TOKENS = 1 << 16

# Per-token task row of the batch being run (0 = base model), filled before each forward; padding stays 0.
TOKEN_TASK_ROWS = torch.zeros(_MAX_TOKENS, dtype=torch.long)
# A task's private key -> its remap row, in the worker process. `worker.py` fills it when it loads a task.
TASK_ROWS: dict[str, int] = {}


def register() -> None:
    """vLLM plugin entry point: swap in the banked experts layer and the per-token task tagging."""
    if not (os.environ.get(BANK_ROWS_ENV) or os.environ.get(BANK_BYTES_ENV)):
        return
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    KVCacheConfig.needs_kv_cache_zeroing = property(lambda config: True)  # read by the scheduler and the workers
    if "RoutedExperts" not in op_registry_oot:
        RoutedExperts.register_oot(_banked_experts_class(RoutedExperts))
    if not getattr(GPUModelRunner._prepare_inputs, "expert_hub", False):
        GPUModelRunner._prepare_inputs = _tag_tokens_with_tasks(GPUModelRunner._prepare_inputs)


def _banked_experts_class(routed_experts: type) -> type:
    max_tasks = int(os.environ.get(MAX_TASKS_ENV, "8"))

    class BankedRoutedExperts(routed_experts):
        """vLLM's routed experts with `extra_rows` more physical rows and a `[tasks + 1, E]` remap."""

        expert_hub_bank = True

        def __init__(self, layer_name, params_dtype, moe_config, *args, **kwargs):
            self.base_experts = moe_config.num_experts
            # one expert's checkpoint shape, before vLLM rounds the sizes up for its kernel
            self.expert_sizes = (moe_config.intermediate_size_per_partition, moe_config.hidden_dim)
            extra_rows = _extra_rows(moe_config, params_dtype or torch.get_default_dtype())
            moe_config.num_experts += extra_rows  # create_weights makes E + extra rows; the router keeps E
            moe_config.num_local_experts += extra_rows
            super().__init__(layer_name, params_dtype, moe_config, *args, **kwargs)
            with torch.no_grad():  # some loaders fill extra rows with copies, others leave them uninitialised
                self.w13_weight[self.base_experts:].zero_()
                self.w2_weight[self.base_experts:].zero_()
            identity = torch.arange(self.base_experts, dtype=torch.int32)
            self.register_buffer("task_remap", identity.repeat(max_tasks + 1, 1), persistent=False)
            self.free_rows = list(range(self.base_experts, self.base_experts + extra_rows))
            self.task_rows: dict[int, list[int]] = {}  # remap row -> physical rows it holds

        def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
            rows = TOKEN_TASK_ROWS[: topk_ids.shape[0]].to(topk_ids.device, non_blocking=True)
            topk_ids = self.task_remap[rows.unsqueeze(1), topk_ids.long()].contiguous()
            return super().forward_modular(x, topk_weights, topk_ids, shared_experts, shared_experts_input)

    return BankedRoutedExperts


def _extra_rows(moe_config, dtype: torch.dtype) -> int:
    """Rows per layer: given, or as many whole experts (gate, up and down) as the byte budget holds."""
    if rows := os.environ.get(BANK_ROWS_ENV):
        return int(rows)
    expert_bytes = 3 * moe_config.hidden_dim * moe_config.intermediate_size_per_partition * dtype.itemsize
    return int(os.environ[BANK_BYTES_ENV]) // expert_bytes


def _tag_tokens_with_tasks(prepare_inputs):
    """Wrap the model runner's input preparation: each scheduled token gets its request's task row."""

    def tagged(self, scheduler_output, num_scheduled_tokens):
        output = prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        num_requests = self.input_batch.num_reqs
        rows = np.zeros(num_requests, dtype=np.int64)
        for position, request_id in enumerate(self.input_batch.req_ids[:num_requests]):
            sampling = self.requests[request_id].sampling_params
            key = ((sampling.extra_args or {}) if sampling is not None else {}).get(TASK_ARG)
            rows[position] = TASK_ROWS.get(key, 0) if isinstance(key, str) else 0  # lists are unhashable
        per_token = torch.from_numpy(np.repeat(rows, num_scheduled_tokens))
        TOKEN_TASK_ROWS[: per_token.shape[0]] = per_token
        TOKEN_TASK_ROWS[per_token.shape[0]:].zero_()
        return output

    tagged.expert_hub = True
    return tagged
