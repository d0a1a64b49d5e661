"""One precision policy for every method: float32 master weights for what trains, the model's dtype for compute.

AdamW's small steps (1e-5 × a weight) mostly round away in bfloat16, so by default every trained parameter is
held and updated in float32 while the forward sees it cast to the model's dtype, exactly the weight a bfloat16
model would hold. ESFT's `ExpertRows` are float32 from the start; PEFT keeps LoRA weights in float32 itself
(`autocast_adapter_dtype`); everything else that trains (full fine-tuning, the shared or non-expert modules an
expert config unfreezes) gets a float32 master here, through a torch parametrization. Gradients, AdamW state and
checkpoints are then float32 for every method, so ESFT and its baselines compare like for like.

`--pure-bf16` trains as the reference does instead (Hugging Face Trainer, `bf16=True` on a bfloat16 model): the
weights, their gradients and AdamW's state stay bfloat16 and the forward runs under bfloat16 autocast.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize


class _CastForCompute(nn.Module):
    """The parametrization: the float32 master, as the model's dtype sees it."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, master: torch.Tensor) -> torch.Tensor:
        return master.to(self.dtype)


def keep_float32_masters(model: nn.Module) -> int:
    """Give every trainable parameter that is not float32 a float32 master; returns how many got one.

    A parameter held by several modules (tied embeddings) keeps one master, registered on each holder. The cast
    of a master is the original weight bit for bit, so the model computes what it computed before.
    """
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.requires_grad and parameter.dtype != torch.float32:
                holders.setdefault(id(parameter), []).append((module, name))
    for places in holders.values():
        first, name = places[0]
        parameter = getattr(first, name)
        compute_dtype = parameter.dtype
        parameter.data = parameter.data.to(torch.float32)
        for module, name in places:
            parametrize.register_parametrization(module, name, _CastForCompute(compute_dtype), unsafe=True)
    return len(holders)


@torch.no_grad()
def drop_float32_masters(model: nn.Module) -> None:
    """Write the masters back as plain parameters of the model's dtype (before the artifact is written)."""
    masters: dict[int, tuple[torch.Tensor, torch.dtype]] = {}
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        # the ModuleDict parametrize registers, which nn.Module types as Tensor | Module
        parametrizations = cast(Mapping[str, parametrize.ParametrizationList], module.parametrizations)
        for name in list(parametrizations):
            compute_cast = parametrizations[name][0]
            if isinstance(compute_cast, _CastForCompute):
                master = parametrizations[name].original
                # leave_parametrized=False puts the master itself back: tied holders keep sharing one parameter
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                masters[id(master)] = (master, compute_cast.dtype)
    for master, dtype in masters.values():
        master.data = master.data.to(dtype)
