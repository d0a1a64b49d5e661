"""How checkpoints and adapters name a routed expert's tensors: `model.layers.{L}.mlp.experts.{E}.{tensor}`.

Every supported family stores its MoE block at `model.layers.{L}.mlp` and names one expert's weights like a
transformers-v4 checkpoint (`gate_proj.weight`, `up_proj.weight`, `down_proj.weight`, gpt_oss' biases), so the
names are spelled here once: the adapter, the serving worker and the base fingerprint read and write them.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_EXPERT_KEY = re.compile(r"(?P<prefix>.+)\.experts\.(?P<expert>\d+)\.(?P<tensor>\w+\.(weight|bias))")
_LAYER = re.compile(r"layers\.(\d+)\.")


class ExpertKey(NamedTuple):
    """A routed expert's tensor key, taken apart. `layer` is None when the prefix names no decoder layer."""

    prefix: str  # the MoE block, e.g. `model.layers.3.mlp`
    layer: int | None
    expert: int
    tensor: str  # e.g. `gate_proj.weight`


def expert_key(block: str, expert: int, tensor: str) -> str:
    """A routed expert's tensor under its MoE block's name (`model.layers.3.mlp` -> `...mlp.experts.7.up_proj.weight`)."""
    return f"{block}.experts.{expert}.{tensor}"


def expert_checkpoint_key(layer: int, expert: int, tensor: str) -> str:
    """A routed expert's tensor as checkpoints and adapters name it (`model.layers.3.mlp.experts.7.up_proj.weight`)."""
    return expert_key(f"model.layers.{layer}.mlp", expert, tensor)


def parse_expert_key(key: str) -> ExpertKey | None:
    """The parts of a routed-expert tensor key; None for any other tensor (shared experts, attention, ...)."""
    match = _EXPERT_KEY.fullmatch(key)
    if match is None:
        return None
    layer = _LAYER.search(match["prefix"])
    return ExpertKey(match["prefix"], int(layer.group(1)) if layer else None, int(match["expert"]), match["tensor"])


def canonical_key(key: str) -> str:
    """Published ESFT adapters sometimes drop the leading `model.`."""
    return f"model.{key}" if key.startswith("layers.") else key
