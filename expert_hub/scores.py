"""`ExpertScores`: per layer and routed expert, how much a task uses it.

The two ESFT scores over N tokens, with k experts chosen per token:
- Token Selection Ratio: (times the expert was in a token's top-k) / k / N. Sums to 1 per layer.
- Average Gate Score: (sum of the expert's gate weight over tokens, 0 when not chosen) / N.
The JSON file keeps the reference repo's `summary.json` keys (`token_scores`, `gate_scores`: layer -> expert
-> score), so either tool reads the other's output, and adds the raw counts and where they came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import InvalidInputError
from .io import numbered_lines, read_json, write_json_atomic

ScoreFunction = Literal["token", "gate"]
SCORE_FUNCTIONS: tuple[str, ...] = ("token", "gate")
FORMAT = "expert-hub.scores/1"


@dataclass
class LayerCounts:
    """What was observed in one layer: the raw material both scores come from."""

    tokens: int
    selections: list[int]  # per expert: times in a token's top-k
    gate_sums: list[float]  # per expert: sum of its gate weights

    def token_scores(self, top_k: int) -> list[float]:
        return [count / top_k / self.tokens if self.tokens else 0.0 for count in self.selections]

    def gate_scores(self) -> list[float]:
        return [total / self.tokens if self.tokens else 0.0 for total in self.gate_sums]


@dataclass
class ExpertScores:
    """Scores per layer (keys are the model's layer indices) and expert id."""

    token_scores: dict[int, dict[int, float]]
    gate_scores: dict[int, dict[int, float]]
    counts: dict[int, LayerCounts] | None = None  # absent when read from a published summary.json
    top_k: int | None = None
    source: dict = field(default_factory=dict)  # model id, data description, ...

    @classmethod
    def from_counts(cls, counts: dict[int, LayerCounts], top_k: int, source: dict | None = None) -> ExpertScores:
        return cls(
            token_scores={layer: dict(enumerate(c.token_scores(top_k))) for layer, c in counts.items()},
            gate_scores={layer: dict(enumerate(c.gate_scores())) for layer, c in counts.items()},
            counts=counts,
            top_k=top_k,
            source=dict(source or {}),
        )

    def by(self, score_function: ScoreFunction) -> dict[int, dict[int, float]]:
        if score_function not in SCORE_FUNCTIONS:
            raise InvalidInputError(f"unknown score function {score_function!r}; use one of {SCORE_FUNCTIONS}")
        return self.token_scores if score_function == "token" else self.gate_scores

    def to_json(self) -> dict:
        data = {
            "format": FORMAT,
            "source": self.source,
            "top_k": self.top_k,
            "token_scores": _stringify(self.token_scores),
            "gate_scores": _stringify(self.gate_scores),
        }
        if self.counts is not None:
            data["counts"] = {
                str(layer): {"tokens": c.tokens, "selections": c.selections, "gate_sums": c.gate_sums}
                for layer, c in self.counts.items()
            }
        return data

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ExpertScores:
        """Read an expert-hub scores file or the reference repo's `summary.json`."""
        data = read_json(path)
        try:
            counts = data.get("counts")
            return cls(
                token_scores=_numeric_keys(data["token_scores"]),
                gate_scores=_numeric_keys(data["gate_scores"]),
                counts={int(layer): LayerCounts(**c) for layer, c in counts.items()} if counts else None,
                top_k=data.get("top_k"),
                source=data.get("source", {}),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise InvalidInputError(
                f"{path} is not an expert scores file (expected token_scores and gate_scores per layer): {error}"
            ) from error


def _stringify(scores: dict[int, dict[int, float]]) -> dict[str, dict[str, float]]:
    return {str(layer): {str(e): s for e, s in experts.items()} for layer, experts in scores.items()}


def _numeric_keys(scores: dict) -> dict[int, dict[int, float]]:
    return {int(layer): {int(e): float(s) for e, s in experts.items()} for layer, experts in scores.items()}


_LOG_NAME = re.compile(r"expert_weights_(\d+)\.txt")


def scores_from_routing_logs(directory: str | Path, top_k: int, num_experts: int | None = None) -> ExpertScores:
    """Scores from the reference repo's raw routing logs (`expert_weights_{layer}.txt`).

    Each line is one sequence: the top-k expert ids of every token, flattened and tab-separated, a double
    tab, then the matching gate weights. Files are streamed line by line; the reference writes one folder per
    rank (`rank_*/expert_weights_{layer}.txt`), and a layer's files in all subfolders are added up. Without
    `num_experts`, the largest id seen decides it.
    """
    directory = Path(directory)
    if top_k < 1:
        raise InvalidInputError(f"--top-k must be at least 1, got {top_k}")
    logs: dict[int, list[Path]] = {}
    for path in sorted(directory.rglob("expert_weights_*.txt")) if directory.is_dir() else []:
        if match := _LOG_NAME.fullmatch(path.name):
            logs.setdefault(int(match.group(1)), []).append(path)
    if not logs:
        raise InvalidInputError(f"no expert_weights_<layer>.txt files in {directory}")
    raw = {layer: _read_routing_logs(paths, top_k) for layer, paths in sorted(logs.items())}
    seen = max(max(selections, default=-1) for _, selections, _ in raw.values()) + 1
    num_experts = num_experts or seen
    if seen > num_experts:
        raise InvalidInputError(f"routing logs name expert {seen - 1}, but --num-experts is {num_experts}")
    counts = {
        layer: LayerCounts(
            tokens=tokens,
            selections=[selections.get(e, 0) for e in range(num_experts)],
            gate_sums=[gate_sums.get(e, 0.0) for e in range(num_experts)],
        )
        for layer, (tokens, selections, gate_sums) in raw.items()
    }
    return ExpertScores.from_counts(counts, top_k, source={"routing_logs": str(directory)})


def _read_routing_logs(paths: list[Path], top_k: int) -> tuple[int, dict[int, int], dict[int, float]]:
    tokens = 0
    selections: dict[int, int] = {}
    gate_sums: dict[int, float] = {}
    for path in paths:
        for number, line in numbered_lines(path):
            try:
                ids_part, weights_part = line.rstrip("\n").split("\t\t")
                ids = [int(value) for value in ids_part.split("\t")]
                weights = [float(value) for value in weights_part.split("\t")]
            except ValueError as error:
                raise InvalidInputError(
                    f"{path}:{number}: expected tab-separated expert ids, a double tab, then their gate weights"
                ) from error
            if len(ids) != len(weights) or len(ids) % top_k:
                raise InvalidInputError(
                    f"{path}:{number}: {len(ids)} ids and {len(weights)} weights do not form tokens of top-{top_k}"
                )
            tokens += len(ids) // top_k
            for expert, weight in zip(ids, weights):
                selections[expert] = selections.get(expert, 0) + 1
                gate_sums[expert] = gate_sums.get(expert, 0.0) + weight
    return tokens, selections, gate_sums
