"""Choosing a task from a prompt's own routing: `"model": "auto"` and `expert-hub route`.

The server knows how the base model routes each task's prompts, so a new prompt's routing through the first MoE
layers is a task signature that costs a fraction of its prefill and needs no classifier. Those layers' routing
depends on no task's experts (every task shares the layers before them), so one pass of the base serves every
candidate.

A task's `RoutingProfile` is, per MoE layer, each routed expert's share of the top-k selections over the task's
*prompts* (the text a request carries, formatted as training formats it). Measured on the demo base with its
built-in tasks: prompt profiles pick the right task for every held-out prompt from the first MoE layer on, where
the selection scores of whole conversations (prompt and answer, what ESFT selects experts with) pick it for 71-80%:
answers route differently from prompts (`benchmarks/bench_auto_routing.py`).

A prompt is scored against each profile by the log-likelihood of its routing under the profile's shares, per
selection and against uniform routing (log 1/E): 0 is chance, higher explains the routing better. The best task
runs when its score reaches `threshold`; below it the prompt runs on the base model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import InvalidInputError
from .families import moe_layers
from .io import read_json, write_json_atomic
from .routing import RoutingRecorder, score_model

PROFILE_FILE = "routing_profile.json"
FORMAT = "expert-hub.routing-profile/1"
DEFAULT_DEPTH = 2  # MoE layers a prompt runs through before it is routed
DEFAULT_THRESHOLD = 0.06  # nats per selection over chance; the demo base's held-out tasks stay under it
_FLOOR = 1e-4  # share given to an expert a task never used, so one stray selection is not -infinity


@dataclass
class RoutingProfile:
    """Per MoE layer, each routed expert's share of a task's prompt tokens' selections (each layer sums to 1)."""

    shares: dict[int, list[float]]
    tokens: int  # prompt tokens it was measured on

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PROFILE_FILE
        write_json_atomic(path, {"format": FORMAT, "tokens": self.tokens, "shares": self.shares})
        return path

    @classmethod
    def load(cls, directory: str | Path) -> RoutingProfile | None:
        """The profile stored in an adapter directory, None when it has none."""
        path = Path(directory) / PROFILE_FILE
        if not path.is_file():
            return None
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InvalidInputError(f"{path} is not an expert-hub routing profile ({FORMAT})")
        try:
            shares = {int(layer): [float(share) for share in values] for layer, values in data["shares"].items()}
            return cls(shares, int(data["tokens"]))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise InvalidInputError(f"{path} is malformed: {error}") from error


def profile_prompts(model: nn.Module, prompts: Iterable[list[int]], batch_size: int = 8) -> RoutingProfile:
    """The routing profile of `prompts` (token ids, as the server will see them) on the base `model`."""
    scores = score_model(model, prompts, batch_size=batch_size)
    tokens = scores.source["tokens_scored"]
    if not tokens:
        raise InvalidInputError("no prompt tokens to profile")
    shares = {layer: [by_expert[e] for e in sorted(by_expert)] for layer, by_expert in scores.token_scores.items()}
    return RoutingProfile(shares, tokens)


@dataclass(frozen=True)
class RouteChoice:
    """Where a prompt goes: `task` (None: the base model), every candidate's score, best first, and the best
    task's posterior among the candidates (equal priors)."""

    task: str | None
    scores: dict[str, float]
    confidence: float


class _Routed(Exception):
    """Raised by the last router a prompt needs: the layers after it never run."""


class TaskRouter:
    """Routes prompts among tasks by their profiles, running the base `model` only up to `depth` MoE layers."""

    def __init__(self, model: nn.Module, depth: int = DEFAULT_DEPTH, threshold: float = DEFAULT_THRESHOLD):
        layers = moe_layers(model)
        if not 1 <= depth <= len(layers):
            raise InvalidInputError(f"the routing depth must be 1 to {len(layers)} (the model's MoE layers)")
        self.model, self.threshold = model.eval(), threshold
        self.layers = layers[:depth]

    @torch.no_grad()
    def route(self, token_ids: list[int], profiles: dict[str, RoutingProfile]) -> RouteChoice:
        """The task among `profiles` whose routing best explains the prompt's, or None (the base model)."""
        if not profiles:
            raise InvalidInputError("auto routing needs at least one task with a routing profile")
        if not token_ids:
            raise InvalidInputError("the prompt is empty: there is nothing to route")
        log_shares = {name: self._log_shares(name, profile) for name, profile in profiles.items()}
        counts = self._selections(token_ids)  # [depth, experts]
        chance = sum(math.log(layer.num_experts) for layer in self.layers) / len(self.layers)
        totals = {name: (counts * shares).sum().item() for name, shares in log_shares.items()}
        scores = {name: total / counts.sum().item() + chance for name, total in totals.items()}
        ranked = dict(sorted(scores.items(), key=lambda item: item[1], reverse=True))
        best = next(iter(ranked))
        posterior = torch.softmax(torch.tensor(list(totals.values()), dtype=torch.float64), 0)
        confidence = posterior[list(totals).index(best)].item()
        return RouteChoice(best if ranked[best] >= self.threshold else None, ranked, confidence)

    def _log_shares(self, name: str, profile: RoutingProfile) -> torch.Tensor:
        """[depth, experts]: the log of the profile's shares in the layers routed on."""
        for layer in self.layers:
            if len(profile.shares.get(layer.index, ())) != layer.num_experts:
                raise InvalidInputError(f"task {name}'s routing profile does not fit the model (layer {layer.index})")
        return torch.stack([torch.tensor(profile.shares[layer.index]).clamp_min(_FLOOR).log() for layer in self.layers])

    def _selections(self, token_ids: list[int]) -> torch.Tensor:
        """How often each expert of the first `depth` MoE layers is in the prompt tokens' top-k."""
        device = next(self.model.parameters()).device

        def stop(*_):
            raise _Routed

        with RoutingRecorder(self.model) as recorder:
            handle = self.layers[-1].router.register_forward_hook(stop)  # after the recorder's hook: counted first
            try:
                self.model.base_model(input_ids=torch.tensor([token_ids], device=device), use_cache=False)
            except _Routed:
                pass
            finally:
                handle.remove()
        return torch.stack([recorder.selections[i].float().cpu() for i in range(len(self.layers))])
