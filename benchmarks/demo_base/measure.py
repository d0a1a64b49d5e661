"""What the demo base knows and how it routes: each built-in task's eval score, and routing specialisation.

Specialisation is measured as the paper observes it (section 3): per task and MoE layer, how few experts carry
half of the routing (Token Selection Ratio) against 32 of 64 for a uniform router, how many ESFT-Token selects at
p = 0.2, and how much the selected sets of two different tasks overlap (Jaccard).
"""

from __future__ import annotations

from itertools import combinations
from statistics import mean

from rich.console import Console

from expert_hub.evaluation import evaluate_records
from expert_hub.routing import score_model, token_sequences
from expert_hub.selection import select_experts
from expert_hub.tasks import BUILTIN_TASKS

EVAL_RECORDS = 100


def measure_base(model, tokenizer, console: Console, records: int = EVAL_RECORDS) -> dict:
    evaluation = {}
    for name, task in BUILTIN_TASKS.items():
        result = evaluate_records(
            model, tokenizer, task.eval_records(records), task.metric, max_new_tokens=task.max_new_tokens, batch_size=25
        )
        evaluation[name] = {
            "metric": task.metric,
            "value": round(result["value"], 4),
            "records": result["count"],
            "in_demo_base": task.in_demo_base,
        }
        console.print(f"{name}: {task.metric} {result['value']:.4f}")
    routing = routing_specialisation(model, tokenizer)
    return {"evaluation": evaluation, "routing": routing}


def routing_specialisation(model, tokenizer, tokens: int = 16384, top_p: float = 0.2) -> dict:
    scores = {
        name: score_model(model, token_sequences(task.examples("train"), tokenizer, tokens, 512))
        for name, task in BUILTIN_TASKS.items()
    }
    selections = {name: select_experts(s, "token", top_p).experts for name, s in scores.items()}
    num_experts = len(next(iter(next(iter(scores.values())).token_scores.values())))
    # select_experts' cumulative rule at p = 0.5 picks exactly the experts that carry half of the routing
    halves = {name: select_experts(s, "token", 0.5).experts for name, s in scores.items()}
    per_task = {
        name: {
            "experts_for_half_of_routing": round(mean(len(e) for e in halves[name].values()), 2),
            "esft_token_selected_per_layer": round(mean(len(e) for e in selections[name].values()), 2),
        }
        for name in scores
    }
    overlaps = [_jaccard(selections[a], selections[b]) for a, b in combinations(sorted(selections), 2)]
    return {
        "num_experts": num_experts,
        "uniform_experts_for_half": num_experts / 2,
        "top_p": top_p,
        "tokens_scored_per_task": tokens,
        "per_task": per_task,
        "mean_cross_task_jaccard": round(mean(overlaps), 3),
    }


def _jaccard(first: dict[int, list[int]], second: dict[int, list[int]]) -> float:
    return mean(
        len(set(first[layer]) & set(second[layer])) / len(set(first[layer]) | set(second[layer])) for layer in first
    )
