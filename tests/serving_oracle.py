"""Plain vLLM on merged checkpoints: the oracle the expert-hub server must match.

`make_tasks` builds a tiny base, task adapters and each task's merged checkpoint; `plain_vllm_tokens` runs this file
as a script (vLLM spawns) on them: python serving_oracle.py REQUESTS.json OUT.json [TENSOR_PARALLEL_SIZE], where
REQUESTS maps a checkpoint directory to a list of {"prompt": str, "max_tokens": int}; it writes, per checkpoint, each
request's token ids and their logprobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def make_tasks(family: str, root: Path, tasks: dict, **shape: int) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """A tiny `family` base, an adapter per task with random experts, and each task's checkpoint as `expert-hub merge`
    writes it: what plain vLLM serves as the oracle, so the serving tests check merged checkpoints too. `shape`
    overrides the base's config (a longer context for tests that need requests in flight for a while)."""
    import torch

    from expert_hub import ExpertAdapter, ExpertSelection
    from expert_hub.merge import merge_tasks
    from expert_hub.models import load_base
    from expert_hub.testing import SERVING_SHAPES, build_tiny_model

    base = build_tiny_model(family, root / "base", **SERVING_SHAPES[family] | shape)
    adapters, merged = {}, {}
    for seed, (name, selection) in enumerate(tasks.items()):
        adapter = ExpertAdapter.from_model(load_base(str(base)), ExpertSelection(selection), task=name)
        generator = torch.Generator().manual_seed(100 + seed)
        adapter.tensors = {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in adapter.tensors.items()}
        adapters[name] = adapter.save(root / f"adapter-{name}")
        merged[name] = merge_tasks(str(base), [str(adapters[name])], root / f"merged-{name}").directory
    return base, adapters, merged


def profile_tasks(base: Path, adapters: dict[str, Path], typical_prompts: dict[str, str]) -> None:
    """Give each named task a routing profile from rotations of its typical prompt (for `"model": "auto"`)."""
    from expert_hub.auto_routing import completion_routing_ids, profile_prompts
    from expert_hub.models import load_base
    from expert_hub.testing import byte_tokenizer

    model, tokenizer = load_base(str(base)), byte_tokenizer()
    for name, text in typical_prompts.items():
        samples = [completion_routing_ids(text[i:] + text[:i], tokenizer) for i in range(len(text))]
        profile_prompts(model, samples).save(adapters[name])


def plain_vllm_tokens(
    root: Path, checkpoints: dict[str, Path], prompts: list[tuple[str, int]], tensor_parallel_size: int = 1
) -> dict[str, list[dict]]:
    """Each checkpoint's greedy tokens for each (prompt, max_tokens), one request at a time, by plain vLLM."""
    requests = {str(path): [{"prompt": p, "max_tokens": n} for p, n in prompts] for path in checkpoints.values()}
    requests_file, out = root / "oracle-requests.json", root / "oracle.json"
    requests_file.write_text(json.dumps(requests))
    subprocess.run(
        [sys.executable, __file__, str(requests_file), str(out), str(tensor_parallel_size)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    results = json.loads(out.read_text())
    return {name: results[str(path)] for name, path in checkpoints.items()}


def main() -> None:
    from expert_hub.serving.engine import cpu_thread_binding, uses_mla

    tensor_parallel_size = int(sys.argv[3])
    if binding := cpu_thread_binding(
        tensor_parallel_size
    ):  # the cores each rank gets, as `expert-hub serve` splits them
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: a start costs no spawn
    from vllm import LLM, SamplingParams

    with open(sys.argv[1]) as file:
        requests = json.load(file)
    results = {}
    for checkpoint, prompts in requests.items():
        # As `expert-hub serve` runs on CPU: vLLM's C++ rotary kernel mixes up DeepSeek's batched queries, and its
        # AMX MLA backend refuses float32 weights.
        llm = LLM(
            model=checkpoint,
            dtype="float32",
            max_model_len=512,
            enforce_eager=True,
            seed=0,
            compilation_config={"custom_ops": ["-rotary_embedding"]},
            attention_backend="CPU_MLA" if uses_mla(checkpoint) else None,
            kv_cache_memory_bytes=2**30,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp",
        )
        outputs = [
            llm.generate([p["prompt"]], SamplingParams(temperature=0, max_tokens=p["max_tokens"], logprobs=2))[0]
            for p in prompts
        ]
        results[checkpoint] = [
            {
                "token_ids": list(o.outputs[0].token_ids),
                "logprobs": [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)],
                # the chosen token's lead over the runner-up: where it is tiny, batching may flip it
                "margins": [_margin(lp) for lp in o.outputs[0].logprobs],
            }
            for o in outputs
        ]
        del llm
    with open(sys.argv[2], "w") as out:
        json.dump(results, out)


def _margin(logprobs) -> float:
    values = sorted((entry.logprob for entry in logprobs.values()), reverse=True)
    return values[0] - values[1] if len(values) > 1 else float("inf")


if __name__ == "__main__":
    main()
