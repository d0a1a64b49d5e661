"""Training methods, registered by name: ESFT (`esft-token`, `esft-gate`, `esft`) and the baselines `full`, `lora`.

Each method is one module with one registered `TrainingMethod` class (see `base.py`); importing it here is its
registration. To add a method: write `methods/NAME.py` with a `@register_method` class, and import it below.
"""

from .base import (
    RunContext,
    TrainingMethod,
    artifact_method,
    get_method,
    method_names,
    register_method,
    trainable_parameters,
)
from .esft import ExpertRows, merge_esft, prepare_esft
from .full import prepare_full
from .lora import prepare_lora

__all__ = [
    "ExpertRows",
    "RunContext",
    "TrainingMethod",
    "artifact_method",
    "get_method",
    "merge_esft",
    "method_names",
    "prepare_esft",
    "prepare_full",
    "prepare_lora",
    "register_method",
    "trainable_parameters",
]
