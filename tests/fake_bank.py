"""What the worker sees of one banked MoE layer on a GPU, without vLLM: base rows, spare rows, a remap."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class FakeBankedLayer(torch.nn.Module):
    """`experts` base rows and `spare` bank rows of this rank's `shard` of `shards` (its `intermediate` rows of
    each expert); no CPU `isa` on the kernel, so rows are written unpadded and not prepacked."""

    expert_hub_bank = True

    def __init__(
        self,
        experts: int = 4,
        spare: int = 3,
        intermediate: int = 8,
        hidden: int = 16,
        shard: tuple[int, int] = (0, 1),
        slots: int = 2,
    ):
        super().__init__()
        self.base_experts, self.expert_sizes, self.expert_shard = experts, (intermediate, hidden), shard
        self.w13_weight = torch.zeros(experts + spare, 2 * intermediate, hidden)
        self.w2_weight = torch.zeros(experts + spare, hidden, intermediate)
        self.task_remap = torch.arange(experts, dtype=torch.int32).repeat(slots + 1, 1)
        self.free_rows, self.task_rows = list(range(experts, experts + spare)), {}
        self.quant_method = SimpleNamespace(moe_kernel=SimpleNamespace(fused_experts=SimpleNamespace()))
