"""Plain vLLM on merged checkpoints: the oracle the expert-hub server must match (run as a script: vLLM spawns).

Usage: python serving_oracle.py REQUESTS.json OUT.json, where REQUESTS maps a checkpoint directory to a list of
{"prompt": str, "max_tokens": int}; writes, per checkpoint, each request's token ids and their logprobs.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    with open(sys.argv[1]) as file:
        requests = json.load(file)
    results = {}
    for checkpoint, prompts in requests.items():
        # As `expert-hub serve` runs on CPU: vLLM's C++ rotary kernel mixes up DeepSeek's batched queries.
        llm = LLM(
            model=checkpoint,
            dtype="float32",
            max_model_len=512,
            enforce_eager=True,
            seed=0,
            compilation_config={"custom_ops": ["-rotary_embedding"]},
            kv_cache_memory_bytes=2**30,
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
