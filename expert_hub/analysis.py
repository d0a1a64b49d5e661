"""What `expert-hub analyze` measures: how concentrated a task's routing is, how much tasks share, how far experts moved.

The paper's case for ESFT rests on two observations about a task's routing: it is concentrated (a few experts per
layer take most of the tokens) and it differs between tasks (their top experts barely overlap). These functions
measure both from expert scores, and, for a trained adapter, how far training moved each selected expert. They
return plain numbers and draw nothing (`plots.py` does), so they are checked directly on the published scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import ExpertAdapter, fingerprint_selection
from .errors import AdapterMismatchError, InvalidInputError
from .families import expert_views, moe_layers, parse_expert_key
from .scores import ExpertScores, ScoreFunction
from .selection import ExpertSelection

LEVELS: tuple[float, ...] = (0.5, 0.8, 0.95)  # shares of a layer's routing mass the concentration is read at
_TOLERANCE = 1e-9  # float sums of shares that should reach a level exactly (0.5 + 0.3 < 0.8 in binary)


def routing_shares(scores: ExpertScores, by: ScoreFunction = "token") -> dict[int, list[float]]:
    """Per layer, each expert's share of the layer's routing mass, as a list indexed by expert id.

    Token scores are shares already (up to the published files' 4-decimal rounding); gate scores sum to the
    layer's mean top-k gate weight (0.26-0.53 per layer for DeepSeek-V2-Lite), so both are divided by the layer's
    total, which makes layers and tasks comparable on one colour scale.
    """
    shares = {}
    for layer, experts in sorted(scores.by(by).items()):
        total = sum(experts.values())
        if total <= 0:
            raise InvalidInputError(f"layer {layer} has no {by} scores (were any tokens scored?)")
        width = max(experts, default=-1) + 1
        shares[layer] = [experts.get(expert, 0.0) / total for expert in range(width)]
    return shares


@dataclass
class Concentration:
    """Per layer, the fewest experts whose shares reach each level, and the same count under uniform routing."""

    levels: tuple[float, ...]
    experts: dict[int, list[int]]  # layer -> one count per level
    uniform: dict[int, list[int]]  # layer -> ceil(level x experts in the layer), one per level

    def mean(self) -> list[float]:
        """Mean count over layers, one per level."""
        return [sum(counts[i] for counts in self.experts.values()) / len(self.experts) for i in range(len(self.levels))]

    def mean_uniform(self) -> list[float]:
        return [sum(counts[i] for counts in self.uniform.values()) / len(self.uniform) for i in range(len(self.levels))]

    def to_json(self) -> dict:
        return {
            "levels": list(self.levels),
            "experts": {str(layer): counts for layer, counts in self.experts.items()},
            "uniform": {str(layer): counts for layer, counts in self.uniform.items()},
            "mean": self.mean(),
            "mean_uniform": self.mean_uniform(),
        }


def concentration(scores: ExpertScores, by: ScoreFunction = "token", levels: Sequence[float] = LEVELS) -> Concentration:
    """How many experts, taken by descending share, cover each level of every layer's routing mass.

    Uniform routing needs `ceil(level x experts)`; the further below that a task stays, the fewer experts ESFT
    must train to cover it.
    """
    if not levels or not all(0 < level <= 1 for level in levels):
        raise InvalidInputError(f"concentration levels must be in (0, 1], got {list(levels)}")
    experts, uniform = {}, {}
    for layer, shares in routing_shares(scores, by).items():
        ordered = sorted(shares, reverse=True)
        running, cumulative = 0.0, []
        for share in ordered:
            running += share
            cumulative.append(running)
        experts[layer] = [
            next((i + 1 for i, total in enumerate(cumulative) if total >= level - _TOLERANCE), len(ordered))
            for level in levels
        ]
        uniform[layer] = [math.ceil(level * len(shares) - _TOLERANCE) for level in levels]
    return Concentration(tuple(levels), experts, uniform)


def jaccard(first: set, second: set) -> float:
    """|A ∩ B| / |A ∪ B|; two empty sets are identical, so 1."""
    union = first | second
    return len(first & second) / len(union) if union else 1.0


def overlap(selections: Mapping[str, ExpertSelection]) -> list[list[float]]:
    """Jaccard similarity of every two tasks' selected `(layer, expert)` pairs, in the mapping's order.

    The paper's second observation, in one number per pair of tasks: if different tasks select different experts,
    their adapters touch different weights.
    """
    pairs = [set(selection.pairs) for selection in selections.values()]
    return [[jaccard(first, second) for second in pairs] for first in pairs]


@torch.no_grad()
def weight_change(adapter: ExpertAdapter, base_model: nn.Module) -> dict[int, dict[int, float]]:
    """Per layer and trained routed expert, ‖W_trained − W_base‖ / ‖W_base‖ over all of the expert's tensors.

    How far training moved each expert, relative to its size: near 0, the expert barely learned anything (and
    perhaps need not be shipped). Measured against another base it would mean nothing, so the base must be the
    one the adapter records (its fingerprint) when it records one. Shared-expert and non-expert tensors are not
    routed experts and are left out.
    """
    recorded = adapter.metadata.base_fingerprint
    if recorded and fingerprint_selection(base_model, adapter.selection) != recorded:
        raise AdapterMismatchError(
            "the base model's weights differ from those the adapter was trained on; "
            f"give its base ({adapter.metadata.base_model or 'see its expert_hub.json'})"
        )
    layers = {layer.prefix: layer for layer in moe_layers(base_model)}
    squares: dict[tuple[int, int], list[float]] = {}  # (layer, expert) -> [sum of squared changes, of base squares]
    for key, trained in adapter.tensors.items():
        parsed = parse_expert_key(key)
        if parsed is None:
            continue
        layer = layers.get(parsed.prefix)
        fits = layer is not None and parsed.expert < layer.num_experts
        base = expert_views(layer.experts, parsed.expert).get(parsed.tensor) if layer and fits else None
        if layer is None or base is None or base.shape != trained.shape:
            raise AdapterMismatchError(f"adapter tensor {key} has no counterpart of its shape in the base model")
        base = base.to(torch.float64)
        change = trained.to(device=base.device, dtype=torch.float64) - base
        totals = squares.setdefault((layer.index, parsed.expert), [0.0, 0.0])
        totals[0] += float(change.square().sum())
        totals[1] += float(base.square().sum())
    changes: dict[int, dict[int, float]] = {}
    for (layer_index, expert), (moved, size) in sorted(squares.items()):
        changes.setdefault(layer_index, {})[expert] = math.sqrt(moved / size) if size else (math.inf if moved else 0.0)
    return changes


@dataclass
class TaskAnalysis:
    """One analysed task: its selection always; its scores and weight changes when the source provides them."""

    name: str
    source: str
    selection: ExpertSelection
    scores: ExpertScores | None = None
    weight_change: dict[int, dict[int, float]] | None = None


def report(tasks: Sequence[TaskAnalysis], by: ScoreFunction, top_p: float | None, levels: Sequence[float]) -> dict:
    """Every number `expert-hub analyze` shows, as JSON-ready data (what `--json` prints and analysis.json holds)."""
    entries = {}
    for task in tasks:
        entry = {
            "source": task.source,
            "selection": task.selection.to_json()["experts"],
            "selected_experts": len(task.selection.pairs),
        }
        if task.scores is not None:
            entry["shares"] = {str(layer): shares for layer, shares in routing_shares(task.scores, by).items()}
            entry["concentration"] = concentration(task.scores, by, levels).to_json()
        if task.weight_change is not None:
            entry["weight_change"] = {
                str(layer): {str(expert): value for expert, value in experts.items()}
                for layer, experts in task.weight_change.items()
            }
        entries[task.name] = entry
    return {
        "score": by,
        "top_p": top_p,
        "tasks": entries,
        "overlap": {"tasks": [task.name for task in tasks], "jaccard": overlap({t.name: t.selection for t in tasks})},
    }
