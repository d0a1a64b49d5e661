"""Recording which experts the routers really choose, and scoring a model on task data.

Forward hooks on each MoE layer's router read the top-k indices and weights it returns — the real
selection, which for DeepSeek-V3 (score bias, group limits) is not the argmax of the logits. Counts
accumulate in fixed-size tensors, so memory does not grow with the number of tokens scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from .data import Message, pad, tokenize_conversation
from .families import moe_layers
from .scores import ExpertScores, LayerCounts

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_SCORE_TOKENS = 2**17  # task tokens scored to select experts, as the paper does
DEFAULT_SEED = 5934875  # the reference's seed (configs/base.yaml), which also orders the conversations scored


class RoutingRecorder:
    """Context manager that counts every router's choices while the model runs.

    Set `token_mask` (a `[batch, seq]` bool tensor) before a padded forward so padding is not counted.
    Hooks return None, so the model's outputs are unchanged. Counters live on each router's device and are
    updated with `index_add_` only, so recording never waits for the accelerator.
    """

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        self.token_mask: torch.Tensor | None = None

        def zeros(layer, size, dtype):
            return torch.zeros(size, dtype=dtype, device=layer.router.weight.device)

        self.tokens = [zeros(layer, (), torch.int64) for layer in self.layers]
        self.selections = [zeros(layer, layer.num_experts, torch.int64) for layer in self.layers]
        self.gate_sums = [zeros(layer, layer.num_experts, torch.float64) for layer in self.layers]
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        self._handles = [
            layer.router.register_forward_hook(self._hook(position)) for position, layer in enumerate(self.layers)
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, position: int) -> Callable:
        layer = self.layers[position]
        scale = layer.gate_scale

        def record(module, inputs, output) -> None:
            _, weights, indices = output
            flat = indices.reshape(-1)
            weights = weights.reshape(-1).to(torch.float64) / scale
            if self.token_mask is None:
                self.tokens[position] += indices.shape[0]
                counts = torch.ones_like(flat)
            else:  # padding tokens count 0 and weigh 0
                keep = self.token_mask.to(flat.device).reshape(-1, 1)
                self.tokens[position] += keep.sum()
                counts = keep.expand_as(indices).reshape(-1).to(torch.int64)
                weights = weights * counts
            self.selections[position].index_add_(0, flat, counts)
            self.gate_sums[position].index_add_(0, flat, weights)

        return record

    def scores(self, source: dict | None = None) -> ExpertScores:
        counts = {
            layer.index: LayerCounts(
                tokens=int(self.tokens[position]),
                selections=self.selections[position].tolist(),
                gate_sums=self.gate_sums[position].tolist(),
            )
            for position, layer in enumerate(self.layers)
        }
        return ExpertScores.from_counts(counts, top_k=self.layers[0].top_k, source=source)


def token_sequences(
    conversations: Iterable[list[Message]], tokenizer, max_tokens: int, max_length: int
) -> Iterator[list[int]]:
    """Tokenized conversations, each cut to `max_length`, stopping once `max_tokens` are yielded.

    They are tokenized as training tokenizes them (the reference format). Give the conversations in the order
    the sample should be taken: `load_conversations(data, seed=...)` shuffles them as the reference does.
    """
    remaining = max_tokens
    for messages in conversations:
        if remaining <= 0:
            return
        ids = tokenize_conversation(messages, tokenizer)[0][: min(max_length, remaining)]
        if ids:
            remaining -= len(ids)
            yield ids


@torch.inference_mode()
def score_model(
    model: PreTrainedModel,
    sequences: Iterable[list[int]],
    batch_size: int = 8,
    source: dict | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> ExpertScores:
    """Run the frozen model over token sequences and score every routed expert of every MoE layer.

    Only the decoder runs: the LM head's logits (batch x length x vocabulary) are never needed. The number of
    tokens scored is added to `source` as `tokens_scored`.
    """
    model.eval()
    device = next(model.parameters()).device
    scored = 0
    with RoutingRecorder(model) as recorder:
        for batch in _batches(sequences, batch_size):
            input_ids, attention_mask = (tensor.to(device) for tensor in pad(batch, 0))
            recorder.token_mask = attention_mask.bool() if len({len(ids) for ids in batch}) > 1 else None
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            tokens = sum(len(ids) for ids in batch)
            scored += tokens
            if on_tokens:
                on_tokens(tokens)
    return recorder.scores({**(source or {}), "tokens_scored": scored})


def _batches(sequences: Iterable[list[int]], size: int) -> Iterator[list[list[int]]]:
    batch = []
    for ids in sequences:
        batch.append(ids)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
