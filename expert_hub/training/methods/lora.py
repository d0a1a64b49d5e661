"""LoRA, the paper's parameter-efficient baseline: PEFT adapters on the linear layers (and the routed experts),
the base frozen; the artifact is a PEFT adapter directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ...errors import InvalidInputError
from ...families import moe_layers
from ...models import load_base
from .base import RunContext, TrainingMethod, disable_router_aux_loss, register_method, write_model_directory

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def prepare_lora(
    model: PreTrainedModel, rank: int, alpha: int, targets: list[str], experts: bool, float32_adapters: bool = True
) -> PeftModel:
    """PEFT LoRA on the given linear modules and, with `experts`, on every layer's fused expert tensors.

    `float32_adapters`: PEFT keeps the adapter weights in float32 whatever the model's dtype (its
    `autocast_adapter_dtype`), the float32 master weights every method trains (`training/precision.py`).
    """
    from peft import LoraConfig, get_peft_model

    disable_router_aux_loss(model)
    target_modules = _all_linear_but_routers(model) if targets == ["all-linear"] else targets
    target_parameters = None
    if experts:
        target_parameters = sorted(
            {
                f"{layer.prefix}.experts.{name}"
                for layer in moe_layers(model)
                for name, _ in layer.experts.named_parameters(recurse=False)
                if name in ("gate_up_proj", "down_proj")
            }
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target_modules,
        target_parameters=target_parameters,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config, autocast_adapter_dtype=float32_adapters)


def _all_linear_but_routers(model: PreTrainedModel) -> list[str]:
    """PEFT's `all-linear` (every linear layer but the output head) without the routers and the routed experts.

    A LoRA router would move tokens to other experts, which no baseline in the paper does, and routed experts get
    LoRA through `experts=True` only, so `--no-lora-experts` leaves every one of them untouched. Linear layers named
    like a transformers-v4 expert projection (the dense and shared-expert MLPs' gate_proj / up_proj / down_proj) are
    left out too: PEFT rewrites any such target into the routed experts' fused tensors (huggingface/peft#3711).
    """
    layers = moe_layers(model)
    excluded = {id(module) for layer in layers for owner in (layer.router, layer.experts) for module in owner.modules()}
    excluded.add(id(model.get_output_embeddings()))
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and id(module) not in excluded
        and name.rsplit(".", 1)[-1] not in _PEFT_REWRITTEN_NAMES
    )


_PEFT_REWRITTEN_NAMES = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


@register_method
class LoRA(TrainingMethod):
    """PEFT LoRA (paper: rank 8 on every linear layer but embeddings and lm_head), lr 1e-4 by default."""

    name = "lora"
    default_learning_rate = 1e-4
    artifact_file = "adapter_config.json"

    @classmethod
    def check_base(cls, config, base_config) -> None:
        """A rank above the model's hidden size adds nothing a layer can use, only memory (rank x the layer's
        sizes, per adapted layer): refuse it before that memory is asked for."""
        hidden_size = getattr(base_config, "hidden_size", None)
        if hidden_size and config.lora_rank > hidden_size:
            raise InvalidInputError(
                f"--lora-rank {config.lora_rank} is above the model's hidden size ({hidden_size}); a LoRA update "
                "gains nothing past a layer's own size"
            )

    def prepare(self, model: PreTrainedModel, run: RunContext) -> PeftModel:
        config = self.config
        return prepare_lora(
            model,
            config.lora_rank,
            config.lora_alpha,
            config.lora_targets,
            config.lora_experts,
            float32_adapters=not config.pure_bf16,
        )

    def write_artifact(self, model: nn.Module, path: Path, tokenizer, metadata: dict) -> Path:
        return write_model_directory(model, path, metadata)

    @classmethod
    def load_artifact(cls, base: str, directory: Path, force: bool = False, **from_pretrained_kwargs) -> nn.Module:
        """A `PeftModel` over the base (`force` is for expert adapters' fingerprints; LoRA has none)."""
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(base, **from_pretrained_kwargs), str(directory))
