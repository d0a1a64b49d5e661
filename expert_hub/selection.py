"""`ExpertSelection` (the reference `expert_cfg.json`) and ESFT's top-p rule."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInputError
from .io import read_json, write_json_atomic
from .scores import ExpertScores, ScoreFunction

DEFAULT_TOP_P: dict[str, float] = {"token": 0.2, "gate": 0.1}  # the paper's choices

logger = logging.getLogger(__name__)


@dataclass
class ExpertSelection:
    """Which routed experts a task trains and ships, per layer (keys are the model's layer indices).

    `shared_experts` / `non_expert_modules` say whether those are trained too, as in the reference schema.
    """

    experts: dict[int, list[int]]
    shared_experts: bool = False
    non_expert_modules: bool = False

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Every selected expert as `(layer, expert_id)`, in layer order."""
        return [(layer, expert) for layer in sorted(self.experts) for expert in self.experts[layer]]

    def to_json(self) -> dict:
        return {
            "experts": {str(layer): list(ids) for layer, ids in sorted(self.experts.items())},
            "shared_experts": self.shared_experts,
            "non_expert_modules": self.non_expert_modules,
        }

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, data: dict, origin: str = "expert config") -> ExpertSelection:
        try:
            experts = {int(layer): ids for layer, ids in data["experts"].items()}
            shared, non_expert = data.get("shared_experts", False), data.get("non_expert_modules", False)
            if not all(isinstance(ids, list) and all(type(e) is int for e in ids) for ids in experts.values()):
                raise TypeError
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise InvalidInputError(
                f'{origin} is not an expert config: expected {{"experts": {{"<layer>": [integer ids]}}, ...}}'
            ) from error
        if not isinstance(shared, bool) or not isinstance(non_expert, bool):
            raise InvalidInputError(f"{origin}: shared_experts and non_expert_modules must be true or false")
        for layer, ids in experts.items():
            if len(set(ids)) != len(ids) or min(ids, default=0) < 0:
                raise InvalidInputError(f"{origin}: layer {layer} lists a negative or repeated expert id")
        return cls(experts, shared, non_expert)

    @classmethod
    def load(cls, path: str | Path) -> ExpertSelection:
        return cls.from_json(read_json(path), origin=str(path))


def select_experts(
    scores: ExpertScores,
    by: ScoreFunction = "token",
    top_p: float | None = None,
    shared_experts: bool = False,
    non_expert_modules: bool = False,
) -> ExpertSelection:
    """Per layer, take experts by descending score until their running sum reaches `top_p`.

    The expert whose score carries the sum past `top_p` is included, as in the paper and reference code;
    ties keep the scores' order. Default `top_p`: 0.2 for token scores, 0.1 for gate scores.
    """
    layer_scores = scores.by(by)
    top_p = DEFAULT_TOP_P[by] if top_p is None else top_p
    if not 0 < top_p <= 1:
        raise InvalidInputError(f"top-p must be in (0, 1], got {top_p}")
    if not layer_scores:
        raise InvalidInputError("the scores hold no layers")
    if by == "gate":
        _warn_past_the_gate_mass(layer_scores, top_p)
    experts = {}
    for layer, expert_scores in layer_scores.items():
        if not any(expert_scores.values()):
            raise InvalidInputError(f"layer {layer} has no scores (were any tokens scored?)")
        chosen, total = [], 0.0
        for expert, score in sorted(expert_scores.items(), key=lambda item: item[1], reverse=True):
            chosen.append(expert)
            total += score
            if total >= top_p:
                break
        experts[layer] = chosen
    return ExpertSelection(experts, shared_experts, non_expert_modules)


def _warn_past_the_gate_mass(layer_scores: dict[int, dict[int, float]], top_p: float) -> None:
    """Warn, once, about the layers whose gate scores sum to less than `top_p`: every expert there is selected.

    Gate scores sum to a layer's mean top-k gate weight, not to 1 (0.26-0.53 per layer for DeepSeek-V2-Lite,
    whose top-6 weights are not renormalised), so a p that suits token scores silently selects whole layers.
    """
    masses = {layer: sum(scores.values()) for layer, scores in sorted(layer_scores.items())}
    if short := {layer: mass for layer, mass in masses.items() if mass < top_p}:
        logger.warning(
            "warning: top-p %g exceeds the total gate score of %d layers (%s), which therefore select every "
            "expert; choose a top-p below %.3f",
            top_p,
            len(short),
            ", ".join(f"{layer}: {mass:.3f}" for layer, mass in short.items()),
            min(masses.values()),
        )
