"""Per-task request and token counters in `/metrics` (Prometheus, beside vLLM's own).

Tokens are counted where they are made: a wrapper around the engine client's `generate`, which every generating
endpoint calls, sees each request's prompt and every completion token handed to the HTTP layer, and records them
when the request ends, whether it finished, failed or its client went away mid-stream. The request counters are
incremented by the middleware (`middleware.py`), which knows a request's task before vLLM sees it; the load and
wait counters by the task manager (`manager.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from prometheus_client import Counter

from . import vllm_contract as vllm
from .bank import TASK_ARG

TASK_REQUESTS = Counter("expert_hub_task_requests", "Requests per task (base = no task)", ["task"])
AUTO_ROUTED_REQUESTS = Counter(
    "expert_hub_auto_routed_requests", 'Requests sent as "model": "auto", by the task chosen (base = none)', ["task"]
)
TASK_PROMPT_TOKENS = Counter("expert_hub_task_prompt_tokens", "Prompt tokens per task", ["task"])
TASK_COMPLETION_TOKENS = Counter("expert_hub_task_completion_tokens", "Generated tokens per task", ["task"])
TASK_LOADS = Counter(
    "expert_hub_task_loads", "Tasks loaded into the bank, by where their rows came from (memory, disk)", ["source"]
)
TASK_WAIT_TIMEOUTS = Counter("expert_hub_task_wait_timeouts", "Requests refused after waiting --task-wait-timeout")


def count_tokens(generate: Callable[..., AsyncIterator], task_of_key: Callable[[object], str | None]):
    """`generate` (an `EngineClient.generate`) that adds each request's tokens to its task's counters."""

    async def counted(prompt, sampling_params, request_id, *args, **kwargs):
        task = task_of_key(vllm.request_extra_args(sampling_params).get(TASK_ARG)) or "base"
        delta = vllm.streams_deltas(sampling_params)
        prompt_tokens, completion_tokens = 0, {}  # completion index -> tokens so far
        try:  # closing vLLM's generator when this one is closed is what aborts the request in the engine
            async with aclosing(generate(prompt, sampling_params, request_id, *args, **kwargs)) as outputs:
                async for output in outputs:
                    prompt_tokens = prompt_tokens or len(output.prompt_token_ids or ())
                    for completion in output.outputs:
                        before = completion_tokens.get(completion.index, 0) if delta else 0
                        completion_tokens[completion.index] = before + len(completion.token_ids)
                    yield output
        finally:
            TASK_PROMPT_TOKENS.labels(task=task).inc(prompt_tokens)
            TASK_COMPLETION_TOKENS.labels(task=task).inc(sum(completion_tokens.values()))

    return counted
