"""Full fine-tuning, the paper's upper baseline: every parameter trains, the artifact is a whole model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from .base import RunContext, TrainingMethod, disable_router_aux_loss, register_method, write_model_directory

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def prepare_full(model: PreTrainedModel) -> PreTrainedModel:
    model.requires_grad_(True)
    disable_router_aux_loss(model)
    return model


@register_method
class FullFineTuning(TrainingMethod):
    """Every parameter trains. The artifact (`model/`) is a complete checkpoint with its tokenizer: serve or
    evaluate it as a base model (`--base RUN/model`)."""

    name = "full"
    artifact_name = "model"

    def prepare(self, model: PreTrainedModel, run: RunContext) -> PreTrainedModel:
        return prepare_full(model)

    def write_artifact(self, model: nn.Module, path: Path, tokenizer, metadata: dict) -> Path:
        return write_model_directory(model, path, metadata, tokenizer)
