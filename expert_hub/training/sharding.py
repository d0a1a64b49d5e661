"""`--sharding fsdp`: train a base that does not fit one device, sharded across the processes with FSDP2.

Each decoder layer, then the whole model, goes through `torch.distributed.fsdp.fully_shard`: a rank keeps 1/N of
every parameter and gathers one layer at a time for its forward and backward. The frozen base, ESFT's trainable
rows, their gradients and AdamW's state are all sharded. accelerate still starts the processes, places the data and
reduces figures; its own FSDP plugin is not used because accelerate 1.15 applies it to GPUs only (on CPUs it stays
DDP without a word), and calling `fully_shard` here does the same on both.

What leaves a run is never sharded. Checkpoints, `best/` and the adapter are gathered into full tensors (`gathered`,
a collective: every rank calls it, for the same tensors in the same order) and rank 0 writes them, so they are the
files a single process writes; a resume reads them on every rank, and each keeps its own shard (`placed_like`).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

if TYPE_CHECKING:
    from .methods.base import TrainedModel


def shard_model(model: TrainedModel) -> nn.Module:
    """Shard a transformers causal LM in place, one FSDP unit per decoder layer plus the rest (embeddings, head).

    No mixed-precision policy: every parameter computes in its own dtype, as in one process. ESFT's float32 rows are
    cast by its forward; a policy would also cast the modules a bfloat16 model keeps in float32.
    """
    # Every layer's input needs a gradient, so that every layer's reduce-scatter runs inside autograd, in layer order,
    # on every rank. Otherwise a rank whose first selected experts got no token would leave those layers to the end of
    # backward, and the ranks' reduce-scatters would pair up different layers.
    model.enable_input_require_grads()
    for layer in cast(nn.ModuleList, model.base_model.layers):  # nn.Module types it as Tensor | Module
        fully_shard(layer)
    fully_shard(model)  # makes `model` an FSDPModule, in place
    # A selected expert that got no token on this rank gets a zero gradient rather than none, so every rank
    # reduce-scatters the same tensors: FSDP's counterpart of DDP's find_unused_parameters.
    cast(FSDPModule, model).set_reduce_scatter_unused_params(True)
    return model


def gradient_sync(model: nn.Module, last: bool, accelerator) -> AbstractContextManager:
    """Gradient accumulation: gradients are reduced across ranks once per step, in the last micro-batch's backward."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else accelerator.no_sync(model)


@torch.no_grad()
def gathered(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded tensors as full ones (on the CPU); tensors that are not sharded as they are."""
    return {
        name: tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor for name, tensor in tensors.items()
    }


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with full tensors: what one process would hold for the same parameters."""
    state = optimizer.state_dict()
    return state | {"state": {index: gathered(moments) for index, moments in state["state"].items()}}


def placed_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as `like`: this rank's shard when `like` is sharded (cut locally, no communication)."""
    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return value
