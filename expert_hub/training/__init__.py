"""ESFT training and its baselines (full fine-tuning, LoRA): `train(TrainingConfig(...))`.

`config.py` declares every setting once; `methods/` holds one registered `TrainingMethod` per method; `loop.py`
runs a method top to bottom; `checkpoint.py` saves and restores what a resume needs.
"""

from .config import TrainingConfig, base_training_defaults
from .loop import StepReport, TrainingResult, train
from .methods import TrainingMethod, get_method, method_names, register_method

__all__ = [
    "StepReport",
    "TrainingConfig",
    "TrainingMethod",
    "TrainingResult",
    "base_training_defaults",
    "get_method",
    "method_names",
    "register_method",
    "train",
]
