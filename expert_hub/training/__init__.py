"""ESFT training and its baselines (full fine-tuning, LoRA): `train(TrainingConfig(...))`."""

from .config import METHODS, TrainingConfig
from .loop import StepReport, TrainingResult, train

__all__ = ["METHODS", "StepReport", "TrainingConfig", "TrainingResult", "train"]
