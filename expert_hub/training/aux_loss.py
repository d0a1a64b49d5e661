"""`--router-aux-loss`: train with the model's own router auxiliary (load-balancing) loss, as the reference does.

The reference trains DeepSeek-V2-Lite with its `MoEGate` auxiliary loss on (`aux_loss_alpha` 0.001, `seq_aux`).
transformers' DeepSeek-V2 does not compute it, so it is ported here from deepseek-ai/ESFT
`deepseek/modeling_deepseek.py`, reading each router's logits and chosen experts through a forward hook. Families
whose transformers model computes an auxiliary loss itself (Qwen-MoE, OLMoE, Mixtral, gpt-oss:
`router_aux_loss_coef`) use that one.

Every micro-batch adds its auxiliary loss whole, as the reference's `AddAuxiliaryLoss` does (its backward passes
the loss a gradient of 1 whatever the gradient accumulation), while the micro-batches' language-model losses add
up to the step's mean. ESFT and LoRA keep the routers frozen, so there the loss trains what feeds them; full
fine-tuning (and an expert config with `non_expert_modules`) trains the routers themselves too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..errors import InvalidInputError
from ..families import moe_layers

if TYPE_CHECKING:
    from peft import PeftModel

    from .methods.base import TrainedModel

# The original DeepseekV2Config's defaults, for configs that do not spell them out.
DEEPSEEK_V2_AUX_LOSS_ALPHA = 0.001
DEEPSEEK_V2_SEQ_AUX = True


class RouterAuxLoss:
    """The weighted auxiliary loss of each training forward of one model."""

    def __init__(self, model: TrainedModel, coefficient: float | None = None):
        config = model.config
        self.check_supported(config)
        # each router's logits and chosen experts, and the batch and sequence sizes, while `losses` runs a forward
        self._recorded: list[tuple[torch.Tensor, torch.Tensor, int, int]] | None = None
        self._hooks: list = []
        self._model_weights: dict[nn.Module, float] = {}
        if config.model_type == "deepseek_v2":
            default = getattr(config, "aux_loss_alpha", DEEPSEEK_V2_AUX_LOSS_ALPHA)
            self.sequence_level = getattr(config, "seq_aux", DEEPSEEK_V2_SEQ_AUX)
            self.from_model = False
            # the base model inside a PEFT (LoRA) model
            inner = cast("PeftModel", model).get_base_model() if hasattr(model, "get_base_model") else model
            self._hooks = [layer.router.register_forward_hook(self._record) for layer in moe_layers(inner)]
        else:
            default = config.router_aux_loss_coef
            self.from_model = True
            config.output_router_logits = True
            # The model would add `router_aux_loss_coef × aux_loss` to its loss; `losses` adds it instead, so the
            # language-model loss stays what the run reports. (Plain float attributes, which nn.Module types and sets
            # as Tensor | Module.)
            self._model_weights = {
                m: cast(float, m.router_aux_loss_coef) for m in model.modules() if hasattr(m, "router_aux_loss_coef")
            }
            for module in self._model_weights:
                module.router_aux_loss_coef = 0.0  # type: ignore[assignment]  # torch's Module.__setattr__ typing
        self.coefficient = default if coefficient is None else coefficient
        self._config = config

    @staticmethod
    def check_supported(config) -> None:
        """Refuse a model with no auxiliary loss of its own (before anything is loaded or written)."""
        if config.model_type != "deepseek_v2" and not hasattr(config, "router_aux_loss_coef"):
            raise InvalidInputError(
                f"--router-aux-loss: {config.model_type} has no router auxiliary loss of its own to train with"
            )

    def remove(self) -> None:
        """Leave the model as it was (the artifact is written from it)."""
        for hook in self._hooks:
            hook.remove()
        for module, weight in self._model_weights.items():
            module.router_aux_loss_coef = weight  # type: ignore[assignment]  # torch's Module.__setattr__ typing
        if self.from_model:
            self._config.output_router_logits = False

    def losses(self, model: nn.Module, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """`model(**inputs)`'s language-model loss and its weighted auxiliary loss."""
        self._recorded = []
        try:
            output = model(**inputs)
            routings = self._recorded
        finally:
            # Only this forward counts: gradient checkpointing runs the routers again during backward.
            self._recorded = None
        if self.from_model:
            raw = output.aux_loss
        else:  # computed here, outside any checkpointed layer, whose recomputation must save what it saved
            raw = torch.stack([deepseek_v2_aux_loss(*routing, self.sequence_level) for routing in routings]).sum()
        return output.loss, self.coefficient * raw.to(output.loss.device)

    def _record(self, router: nn.Module, inputs: tuple, output: tuple) -> None:
        if self._recorded is not None and router.training:
            batch, sequence, _ = inputs[0].shape
            router_logits, _, chosen = output
            self._recorded.append((router_logits, chosen, batch, sequence))


def deepseek_v2_aux_loss(
    router_logits: torch.Tensor, chosen: torch.Tensor, batch: int, sequence: int, sequence_level: bool
) -> torch.Tensor:
    """One layer's auxiliary loss before `aux_loss_alpha`, as `MoEGate.forward` computes it.

    `router_logits`: [batch × sequence, experts]; their softmax is the scores before any group masking.
    `chosen`: the experts each token was routed to ([batch × sequence, top-k]). Padding counts, as there.
    """
    scores = router_logits.softmax(dim=-1, dtype=torch.float32)
    experts, top_k = scores.shape[-1], chosen.shape[-1]
    chosen = chosen.view(batch, -1)
    if sequence_level:  # per sequence: the share of its routings each expert got × its mean score
        counts = torch.zeros(batch, experts, device=scores.device)
        counts.scatter_add_(1, chosen, torch.ones(batch, sequence * top_k, device=scores.device))
        counts.div_(sequence * top_k / experts)
        return (counts * scores.view(batch, sequence, -1).mean(dim=1)).sum(dim=1).mean()
    share = nn.functional.one_hot(chosen.view(-1), num_classes=experts).float().mean(0)
    return (scores.mean(0) * share * experts).sum()
