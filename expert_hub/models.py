"""Loading base models and describing them, with errors that say what to do.

transformers is imported when a model is first loaded, not with this module: `import expert_hub` (and vLLM's
processes, which import the serving plugin) stay quick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors import safe_open
from torch import nn

from .errors import InvalidInputError
from .families import expert_views, family_of, moe_layers
from .io import first_line, read_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BASE_METADATA = "expert_hub_base.json"
# from_pretrained options that also decide where the config comes from
_HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code")


def load_config(base: str, **hub_options):
    """The model's config, checked to be a supported MoE family before any weights are read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base, **hub_options)
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"cannot load model {base!r}: {first_line(error)}") from error
    family_of(config)
    return config


def load_base(base: str, layers: int | None = None, **from_pretrained_kwargs) -> PreTrainedModel:
    """A supported MoE causal LM from a local directory or Hub id (`trust_remote_code` only when asked); with
    `layers`, only its first `layers` decoder layers (the others' weights are never read)."""
    from transformers import AutoModelForCausalLM

    hub_options = {key: value for key, value in from_pretrained_kwargs.items() if key in _HUB_OPTIONS}
    config = load_config(base, **hub_options)
    if layers is not None:
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    try:
        return AutoModelForCausalLM.from_pretrained(base, config=config, **from_pretrained_kwargs)
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"cannot load model {base!r}: {first_line(error)}") from error


def load_tokenizer(base: str, **hub_options):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base, **hub_options)
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"cannot load the tokenizer of {base!r}: {first_line(error)}") from error


def base_metadata(base: str) -> dict:
    """The `expert_hub_base.json` a local base ships (the demo base does: its recipe, scores and the ESFT training
    defaults that suit it), or {}."""
    path = Path(base) / BASE_METADATA
    return read_json(path) if path.is_file() else {}


def resolve_device(name: str | None) -> torch.device:
    """A usable torch device: `name`, or CUDA when available, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise InvalidInputError(f"device {name!r} is not usable here: {first_line(error)}") from error
    return device


@dataclass(frozen=True)
class ModelSummary:
    """What `expert-hub inspect` shows for a model."""

    family: str
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    shared_experts: bool
    expert_parameters: int  # one routed expert's parameter count
    expert_biases: bool
    expert_shapes: dict[str, tuple[int, ...]]  # one routed expert's checkpoint tensors: name -> shape


def meta_model(base: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model's modules and parameter shapes, built on the meta device: no weights are read or allocated."""
    from transformers import AutoModelForCausalLM

    config = load_config(base, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def describe_model(base: str, trust_remote_code: bool = False) -> ModelSummary:
    """Summarise a model from its config alone: the layers are built on the meta device, no weights read."""
    model = meta_model(base, trust_remote_code=trust_remote_code)
    config = model.config
    layers = moe_layers(model)
    first = layers[0]
    shapes = {name: tuple(view.shape) for name, view in expert_views(first.experts, 0).items()}
    return ModelSummary(
        family=config.model_type,
        num_layers=len(cast(nn.ModuleList, model.base_model.layers)),
        moe_layers=[layer.index for layer in layers],
        num_experts=first.num_experts,
        top_k=first.top_k,
        shared_experts=bool(first.shared_expert_modules()),
        expert_parameters=sum(math.prod(shape) for shape in shapes.values()),
        expert_biases=bool(getattr(first.experts, "has_bias", False)),
        expert_shapes=shapes,
    )


def checkpoint_tensors(base: str, keys: set[str]) -> dict[str, torch.Tensor]:
    """Those of `keys` that a local checkpoint directory's safetensors files hold, read without loading the model."""
    found: dict[str, torch.Tensor] = {}
    for file in sorted(Path(base).glob("*.safetensors")) if Path(base).is_dir() else []:
        with safe_open(file, "pt") as handle:
            found |= {key: handle.get_tensor(key) for key in keys & set(handle.keys())}
    return found
