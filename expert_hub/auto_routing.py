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
from typing import TYPE_CHECKING

import torch

from .data import Message, pad, prompt_ids
from .errors import InvalidInputError
from .families import moe_layers
from .io import read_json, write_json_atomic
from .routing import score_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PROFILE_FILE = "routing_profile.json"
FORMAT = "expert-hub.routing-profile/1"
DEFAULT_DEPTH = 2  # MoE layers a prompt runs through before it is routed
DEFAULT_THRESHOLD = 0.06  # nats per selection over chance; the demo base's held-out tasks stay under it
DEFAULT_WINDOW = 32  # prompt tokens routed on
PROFILE_PROMPTS = 256  # task prompts a routing profile is measured on: the demo's tasks separate with 200
_FLOOR = 1e-4  # share given to an expert a task never used, so one stray selection is not -infinity
_USER_TURN = "User:"  # how the training (reference) format opens a user turn: `data.reference_segments`
SHARE_TOLERANCE = 1e-3  # how far a profile layer's shares may sum from 1 (measured ones: float rounding)


@dataclass
class RoutingProfile:
    """Per MoE layer, each routed expert's share of a task's prompt tokens' selections (each layer sums to 1).

    A profile arrives from files other people wrote (import, pull, a served adapter directory), and the router
    multiplies its shares into every auto request's scores: one that is not a distribution over the base's experts
    would win or break every auto request. So a file is checked whole when it is read (`load`), and against the
    served base wherever one is at hand (`check_fits`).
    """

    shares: dict[int, list[float]]
    tokens: int  # prompt tokens it was measured on

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PROFILE_FILE
        write_json_atomic(path, {"format": FORMAT, "tokens": self.tokens, "shares": self.shares})
        return path

    @classmethod
    def load(cls, directory: str | Path) -> RoutingProfile | None:
        """The profile stored in an adapter directory, None when it has none; a file that is not a valid profile is
        refused, naming what is wrong."""
        path = Path(directory) / PROFILE_FILE
        if not path.exists() and not path.is_symlink():
            return None
        try:
            return cls._from_json(read_json(path))
        except InvalidInputError as error:
            raise InvalidInputError(f"{path} is not a valid routing profile: {error}") from error

    @classmethod
    def _from_json(cls, data: object) -> RoutingProfile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InvalidInputError(f"it is not in the {FORMAT} format")
        if extra := sorted(set(data) - {"format", "tokens", "shares"}):
            raise InvalidInputError(f"unexpected fields {', '.join(map(str, extra))}")
        tokens, shares = data.get("tokens"), data.get("shares")
        if type(tokens) is not int or tokens < 1:
            raise InvalidInputError("`tokens` must be a positive whole number")
        if not isinstance(shares, dict) or not shares:
            raise InvalidInputError("`shares` must map each MoE layer to its experts' shares")
        layers = {_layer_index(key): _distribution(key, values) for key, values in shares.items()}
        if len({len(row) for row in layers.values()}) > 1:
            raise InvalidInputError("its layers give shares for different numbers of experts")
        return cls(layers, tokens)

    def check_fits(self, moe_layers: list[int], num_experts: int) -> None:
        """Refuse a profile measured on another model: its layers must be the model's MoE layers, each with a share
        for every routed expert."""
        if sorted(self.shares) != sorted(moe_layers):
            raise InvalidInputError(
                f"the routing profile's layers ({_span(self.shares)}) are not the model's MoE layers "
                f"({_span(moe_layers)})"
            )
        if (experts := len(next(iter(self.shares.values())))) != num_experts:
            raise InvalidInputError(
                f"the routing profile gives shares for {experts} experts per layer; the model has {num_experts}"
            )


def _layer_index(key: str) -> int:
    if not (isinstance(key, str) and key.isascii() and key.isdecimal()):
        raise InvalidInputError(f"{key!r} is not a layer index")
    return int(key)


def _distribution(layer: str, values: object) -> list[float]:
    """One layer's shares: finite, non-negative numbers that sum to 1 (within `SHARE_TOLERANCE`)."""
    if not isinstance(values, list) or not values or not all(type(v) in (int, float) for v in values):
        raise InvalidInputError(f"layer {layer}: the shares must be a list of numbers")
    try:
        row = [float(value) for value in values]
    except OverflowError:  # an integer too large for a float
        row = [math.inf]
    if not all(math.isfinite(value) and value >= 0 for value in row):
        raise InvalidInputError(f"layer {layer}: every share must be a finite number >= 0")
    if abs(math.fsum(row) - 1) > SHARE_TOLERANCE:
        raise InvalidInputError(f"layer {layer}: the shares sum to {math.fsum(row):.6g}, not 1")
    return row


def _span(layers) -> str:
    """Layer indices for a message: `1-26` when they run on, else the first few."""
    ordered = sorted(layers)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}" if len(ordered) > 1 else str(ordered[0])
    return ", ".join(map(str, ordered[:6])) + (", ..." if len(ordered) > 6 else "")


def check_prompt_text(text: str) -> None:
    """Refuse text with nothing to route on: blank, or not Unicode text at all (a lone surrogate, which JSON and a
    shell argument can both carry, encodes to no byte the tokenizer reads)."""
    if not text.strip():
        raise InvalidInputError("the prompt is empty: there is nothing to route")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidInputError(
            f"the prompt is not valid Unicode text (character {error.start} is a lone surrogate)"
        ) from error


def completion_routing_ids(text: str, tokenizer) -> list[int]:
    """The token ids a completion prompt is routed on.

    Profiles are measured on prompts in the training format (`User: {q}\n\nAssistant:`), which a client may send
    or not: bare text (the question alone) routes differently through its first tokens (on the demo base, 13 of 20
    bare math and code questions went to the right task). So bare text is routed as the one user turn it is, in
    the training format; the model still runs on the text as sent.
    """
    check_prompt_text(text)
    if text.lstrip().startswith(_USER_TURN):
        return tokenizer.encode(text)  # as vLLM tokenizes a completion prompt
    return prompt_ids([{"role": "user", "content": text}], tokenizer)


def profile_prompts(model: PreTrainedModel, prompts: Iterable[list[int]], batch_size: int = 8) -> RoutingProfile:
    """The routing profile of `prompts` (token ids, as the server will see them) on the base `model`."""
    scores = score_model(model, prompts, batch_size=batch_size)
    tokens = scores.source["tokens_scored"]
    if not tokens:
        raise InvalidInputError("no prompt tokens to profile")
    shares = {layer: [by_expert[e] for e in sorted(by_expert)] for layer, by_expert in scores.token_scores.items()}
    return RoutingProfile(shares, tokens)


def profile_conversations(
    model: PreTrainedModel,
    tokenizer,
    conversations: Iterable[list[Message]],
    prompts: int = PROFILE_PROMPTS,
    chat_template: bool = False,
    max_tokens: int | None = None,
) -> RoutingProfile:
    """The routing profile of the first `prompts` conversations' prompts (every turn before the answer, formatted as
    training formats them, cut to `max_tokens`) on the base `model`."""
    from itertools import islice

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
    """Where a prompt goes: every candidate's score, best first; the best task's posterior among the candidates
    (equal priors); and the candidates whose score reaches the threshold, best first, so a server whose best task
    was removed meanwhile runs the next one."""

    scores: dict[str, float]
    confidence: float
    eligible: tuple[str, ...]

    @property
    def task(self) -> str | None:
        """The task to run, None for the base model."""
        return self.eligible[0] if self.eligible else None


class _Routed(Exception):
    """Raised by the last router a prompt needs: the layers after it never run."""


class TaskRouter:
    """Routes prompts among tasks by their profiles, running the base `model` only up to `depth` MoE layers, on
    each prompt's first `window` tokens (None: the whole prompt)."""

    def __init__(
        self,
        model: PreTrainedModel,
        depth: int = DEFAULT_DEPTH,
        threshold: float = DEFAULT_THRESHOLD,
        window: int | None = DEFAULT_WINDOW,
    ):
        layers = moe_layers(model)
        if not 1 <= depth <= len(layers):
            raise InvalidInputError(f"the routing depth must be 1 to {len(layers)} (the model's MoE layers)")
        if window is not None and window < 1:
            raise InvalidInputError("the routing window must be at least one token")
        if not math.isfinite(threshold):
            raise InvalidInputError(f"the routing threshold must be a finite number, not {threshold}")
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
            eligible = tuple(name for name, score in ranked.items() if score >= self.threshold)
            choices.append(RouteChoice(ranked, posterior[names.index(next(iter(ranked)))].item(), eligible))
        return choices

    def _log_shares(self, name: str, profile: RoutingProfile) -> torch.Tensor:
        """[depth, experts]: the log of the profile's shares in the layers routed on, floored and normalised again,
        so every task's scores come from a distribution and none can outweigh the others by construction."""
        for layer in self.layers:
            if len(profile.shares.get(layer.index, ())) != layer.num_experts:
                raise InvalidInputError(f"task {name}'s routing profile does not fit the model (layer {layer.index})")
        shares = torch.tensor([profile.shares[layer.index] for layer in self.layers], dtype=torch.float64)
        shares = shares.clamp_min(_FLOOR)
        return (shares / shares.sum(dim=1, keepdim=True)).log().float()

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
