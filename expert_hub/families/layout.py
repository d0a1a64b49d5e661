"""One expert's weights inside transformers' fused expert tensors.

transformers 5 keeps all routed experts of a layer in two fused Parameters. Everything outside this module
sees an expert as the per-expert checkpoint tensors (`gate_proj.weight`, `up_proj.weight`, `down_proj.weight`
and, for gpt_oss, their biases), laid out like `nn.Linear` weights: `[out_features, in_features]`.
The experts module itself declares its layout (`use_experts_implementation` sets `is_concatenated`,
`is_transposed`, `has_bias`), so reading those flags covers every family, gpt_oss' interleaved one included.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Protocol, cast

import torch
from torch import nn

from ..errors import UnsupportedModelError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The fused Parameter that holds each of an expert's checkpoint tensors.
FUSED_TENSOR = {
    "gate_proj.weight": "gate_up_proj",
    "up_proj.weight": "gate_up_proj",
    "down_proj.weight": "down_proj",
    "gate_proj.bias": "gate_up_proj_bias",
    "up_proj.bias": "gate_up_proj_bias",
    "down_proj.bias": "down_proj_bias",
}


class FusedLayout(Protocol):
    """What `expert_views` reads of an experts module: its fused tensors and the flags that lay them out.

    A stand-in with these attributes (`expert_view_in`'s, ESFT's trained rows) reads the same way. An `nn.Module`
    itself types every attribute as `Tensor | Module`, hence the cast to this where a module is read.
    """

    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    gate_up_proj_bias: torch.Tensor  # with has_bias only
    down_proj_bias: torch.Tensor  # with has_bias only
    is_transposed: bool
    is_concatenated: bool
    has_bias: bool


def expert_views(experts: nn.Module | FusedLayout, expert: int) -> dict[str, torch.Tensor]:
    """Views into the fused Parameters for one expert, keyed like its checkpoint tensors.

    Writing into a view writes into the fused Parameter, so reading and writing share this one mapping.
    """
    if not getattr(experts, "has_gate", True) or not hasattr(experts, "gate_up_proj"):
        raise UnsupportedModelError(f"{type(experts).__name__} has no fused gate_up_proj; expert-hub cannot edit it")
    fused = cast(FusedLayout, experts)
    gate_up = fused.gate_up_proj[expert]
    down = fused.down_proj[expert]
    if fused.is_transposed:  # stored [in, out]; checkpoint tensors are [out, in]
        gate_up, down = gate_up.T, down.T
    gate, up = _split_gate_up(gate_up, fused.is_concatenated)
    views = {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}
    if fused.has_bias:
        gate_bias, up_bias = _split_gate_up(fused.gate_up_proj_bias[expert], fused.is_concatenated)
        views |= {
            "gate_proj.bias": gate_bias,
            "up_proj.bias": up_bias,
            "down_proj.bias": fused.down_proj_bias[expert],
        }
    return views


def expert_view_in(experts: nn.Module, fused: torch.Tensor, expert: int, tensor: str) -> torch.Tensor:
    """One expert's checkpoint tensor `tensor` as a view into `fused`: a tensor laid out like `experts`' own fused
    Parameter `FUSED_TENSOR[tensor]` (a checkpoint that stores experts fused, as gpt_oss' do), or a slice of one.

    `experts` only lends its layout (it may live on the meta device); nothing of it is read or written.
    """
    layout = {name: getattr(experts, name) for name in set(FUSED_TENSOR.values()) if hasattr(experts, name)}
    stand_in = SimpleNamespace(
        **(layout | {FUSED_TENSOR[tensor]: fused}),
        has_gate=getattr(experts, "has_gate", True),
        is_transposed=experts.is_transposed,
        is_concatenated=experts.is_concatenated,
        has_bias=experts.has_bias,
    )
    return expert_views(stand_in, expert)[tensor]


def _split_gate_up(gate_up: torch.Tensor, concatenated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if concatenated:  # [gate rows; up rows]
        gate, up = gate_up.chunk(2, dim=0)
        return gate, up
    return gate_up[0::2], gate_up[1::2]  # gate and up rows interleaved


def read_expert(experts: nn.Module, expert: int) -> dict[str, torch.Tensor]:
    """A contiguous copy of one expert's checkpoint tensors."""
    return {name: view.detach().contiguous().clone() for name, view in expert_views(experts, expert).items()}


@torch.no_grad()
def write_expert(experts: nn.Module, expert: int, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into one expert's rows; the caller has checked names and shapes."""
    views = expert_views(experts, expert)
    for name, tensor in tensors.items():
        views[name].copy_(tensor)
