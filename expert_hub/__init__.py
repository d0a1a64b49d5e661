"""expert-hub: Expert-Specialized Fine-Tuning (ESFT) for Hugging Face Mixture-of-Experts models.

Score how much a task uses each routed expert, select the top ones per layer, train only those, and ship
them as a small adapter that `load_model` puts back into the base model.
"""

from .adapter import AdapterMetadata, ExpertAdapter, fingerprint_selection
from .errors import AdapterMismatchError, ExpertHubError, InvalidInputError, UnsupportedModelError
from .families import FAMILIES, moe_layers
from .loading import load_model, resolve_adapter
from .routing import RoutingRecorder, score_model, token_sequences
from .scores import ExpertScores, LayerCounts, scores_from_routing_logs
from .selection import ExpertSelection, select_experts

__all__ = [
    "FAMILIES",
    "AdapterMetadata",
    "AdapterMismatchError",
    "ExpertAdapter",
    "ExpertHubError",
    "ExpertScores",
    "ExpertSelection",
    "InvalidInputError",
    "LayerCounts",
    "RoutingRecorder",
    "UnsupportedModelError",
    "fingerprint_selection",
    "load_model",
    "moe_layers",
    "resolve_adapter",
    "score_model",
    "scores_from_routing_logs",
    "select_experts",
    "token_sequences",
]
