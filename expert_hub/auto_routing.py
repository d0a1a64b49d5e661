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

Only a prompt's first `window` tokens are routed on, so a long prompt costs no more than a short one. Attention is
causal, so those tokens route exactly as they do inside the whole prompt. On the demo base, at depth 2, the first 32
tokens pick the task for 99.7% of held-out prompts of 32 tokens or more, where whole prompts pick it for 98.0%: a
task's opening words are its clearest signature. A fixed preamble longer than the window (a long system prompt)
leaves nothing to tell tasks apart by; raise the window for such prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import pad
from .errors import InvalidInputError
from .families import moe_layers
from .io import read_json, write_json_atomic
from .routing import score_model

PROFILE_FILE = "routing_profile.json"
FORMAT = "expert-hub.routing-profile/1"
DEFAULT_DEPTH = 2  # MoE layers a prompt runs through before it is routed
DEFAULT_THRESHOLD = 0.06  # nats per selection over chance; the demo base's held-out tasks stay under it
DEFAULT_WINDOW = 32  # prompt tokens routed on
PROFILE_PROMPTS = 256  # task prompts a routing profile is measured on: the demo's tasks separate with 200
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


def profile_conversations(
    model: nn.Module,
    tokenizer,
    conversations: Iterable[list[dict]],
    prompts: int = PROFILE_PROMPTS,
    chat_template: bool = False,
    max_tokens: int | None = None,
) -> RoutingProfile:
    """The routing profile of the first `prompts` conversations' prompts (every turn before the answer, formatted as
    training formats them, cut to `max_tokens`) on the base `model`."""
    from itertools import islice

    from .data import prompt_ids

    return profile_prompts(
        model,
        (
            prompt_ids(messages[:-1], tokenizer, chat_template)[:max_tokens]
            for messages in islice(conversations, prompts)
        ),
    )


def profile_task_data(base: str, data: str | Path, prompts: int = PROFILE_PROMPTS) -> RoutingProfile:
    """The routing profile of task data (conversations) on `base`: for an adapter that came without one, such as a
    pulled published one."""
    from .data import load_conversations
    from .models import load_base, load_tokenizer

    return profile_conversations(load_base(base), load_tokenizer(base), load_conversations(str(data)), prompts)


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
    """Routes prompts among tasks by their profiles, running the base `model` only up to `depth` MoE layers, on
    each prompt's first `window` tokens (None: the whole prompt)."""

    def __init__(
        self,
        model: nn.Module,
        depth: int = DEFAULT_DEPTH,
        threshold: float = DEFAULT_THRESHOLD,
        window: int | None = DEFAULT_WINDOW,
    ):
        layers = moe_layers(model)
        if not 1 <= depth <= len(layers):
            raise InvalidInputError(f"the routing depth must be 1 to {len(layers)} (the model's MoE layers)")
        if window is not None and window < 1:
            raise InvalidInputError("the routing window must be at least one token")
        self.model, self.threshold, self.window = model.eval(), threshold, window
        self.layers = layers[:depth]

    def route(self, token_ids: list[int], profiles: dict[str, RoutingProfile]) -> RouteChoice:
        """The task among `profiles` whose routing best explains the prompt's, or None (the base model)."""
        return self.route_many([token_ids], profiles)[0]

    @torch.no_grad()
    def route_many(self, prompts: list[list[int]], profiles: dict[str, RoutingProfile]) -> list[RouteChoice]:
        """`route` for several prompts in one padded forward pass."""
        if not profiles:
            raise InvalidInputError("auto routing needs at least one task with a routing profile")
        if not all(prompts):
            raise InvalidInputError("the prompt is empty: there is nothing to route")
        names = list(profiles)
        log_shares = torch.stack([self._log_shares(name, profiles[name]) for name in names])  # [tasks, depth, E]
        counts = self._selections([prompt[: self.window] for prompt in prompts])  # [prompts, depth, E]
        totals = torch.einsum("pde,tde->pt", counts, log_shares)
        chance = sum(math.log(layer.num_experts) for layer in self.layers) / len(self.layers)
        scores = totals / counts.sum(dim=(1, 2)).unsqueeze(1) + chance
        posteriors = torch.softmax(totals.double(), dim=1)
        choices = []
        for prompt_scores, posterior in zip(scores.tolist(), posteriors):
            ranked = dict(sorted(zip(names, prompt_scores), key=lambda item: item[1], reverse=True))
            best = next(iter(ranked))
            task = best if ranked[best] >= self.threshold else None
            choices.append(RouteChoice(task, ranked, posterior[names.index(best)].item()))
        return choices

    def _log_shares(self, name: str, profile: RoutingProfile) -> torch.Tensor:
        """[depth, experts]: the log of the profile's shares in the layers routed on."""
        for layer in self.layers:
            if len(profile.shares.get(layer.index, ())) != layer.num_experts:
                raise InvalidInputError(f"task {name}'s routing profile does not fit the model (layer {layer.index})")
        return torch.stack([torch.tensor(profile.shares[layer.index]).clamp_min(_FLOOR).log() for layer in self.layers])

    def _selections(self, prompts: list[list[int]]) -> torch.Tensor:
        """[prompts, depth, experts]: how often each expert of the first `depth` MoE layers is in each prompt's
        tokens' top-k (padding not counted)."""
        device = next(self.model.parameters()).device
        input_ids, attention_mask = (tensor.to(device) for tensor in pad(prompts, 0))
        counts = torch.zeros(len(prompts), len(self.layers), self.layers[0].num_experts)

        def record(position: int):
            def hook(module, inputs, output) -> None:
                indices = output[2].reshape(len(prompts), -1, output[2].shape[-1]).cpu()  # [prompts, tokens, k]
                kept = attention_mask.cpu().unsqueeze(-1).expand_as(indices).to(counts.dtype)
                counts[:, position].scatter_add_(1, indices.reshape(len(prompts), -1), kept.reshape(len(prompts), -1))
                if position == len(self.layers) - 1:
                    raise _Routed  # the layers after the last one routed on never run

            return hook

        handles = [layer.router.register_forward_hook(record(i)) for i, layer in enumerate(self.layers)]
        try:
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Routed:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return counts
