"""What each training method makes trainable, and the artifact it ships.

- ESFT: only the selected experts train. Their rows are copied into a small trainable `ExpertRows` module beside
  the frozen fused Parameters, and an experts implementation registered with transformers (`esft`) sends each
  token-expert pair to one or the other: two grouped matmuls, the frozen one computing no weight gradients. So
  gradients, optimizer state and weight decay touch only the selected rows, and the base stays bit-identical.
  `shared_experts` / `non_expert_modules` in the selection unfreeze those modules too.
- full: every parameter. lora: PEFT LoRA adapters, the base frozen.
Router auxiliary losses stay off for all of them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

from ..families import moe_layers, split_parameters
from ..selection import ExpertSelection

ESFT_EXPERTS = "esft"


class ExpertRows(nn.Module):
    """Trainable copies of some experts' rows of a fused experts module, with the id -> row map.

    The rows are float32 master weights whatever the model's dtype: AdamW's small steps would mostly round away
    in bfloat16. The forward casts them to the model's dtype, so it computes what the merged model computes.
    """

    def __init__(self, experts: nn.Module, rows: list[int]):
        super().__init__()
        index = torch.tensor(rows, dtype=torch.long, device=experts.gate_up_proj.device)
        position = torch.full((experts.gate_up_proj.shape[0],), -1, dtype=torch.long, device=index.device)
        position[index] = torch.arange(len(rows), device=index.device)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("position", position, persistent=False)  # expert id -> row here, -1 if frozen
        self.weights = nn.ParameterDict({
            name: nn.Parameter(fused.detach()[index].to(torch.float32))
            for name, fused in experts.named_parameters(recurse=False)
        })


class _ExpertsView:
    """What `grouped_mm_experts_forward` reads from an experts module, over the trainable rows."""

    def __init__(self, experts: nn.Module, rows: ExpertRows):
        self.__dict__.update({name: weight.to(experts.gate_up_proj.dtype) for name, weight in rows.weights.items()})
        self.num_experts = len(rows.index)
        self.has_gate, self.has_bias, self.is_transposed = experts.has_gate, experts.has_bias, experts.is_transposed
        self._apply_gate, self.act_fn = experts._apply_gate, getattr(experts, "act_fn", None)
        self._is_expert_parallel = False


def esft_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """Token-expert pairs of frozen experts use the fused Parameters, those of selected experts `ExpertRows`.

    Each group of pairs runs through transformers' own grouped-matmul kernel as single-expert tokens with unit
    weight, so the frozen group computes no weight gradients and neither group computes anything twice. The
    routing weights and the top-k sum are applied here, in the dtype the standard kernel uses, so the output is
    bit-identical to it.
    """
    trainable = getattr(self, "esft_rows", None)
    if trainable is None:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, top_k = top_k_index.shape
    expert_ids, weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)
    rows = trainable.position[expert_ids]
    selected = rows >= 0
    pair_outputs = hidden_states.new_zeros(expert_ids.numel(), hidden_states.shape[-1])
    for pairs, experts, ids in (((~selected).nonzero().squeeze(1), self, expert_ids),
                                (selected.nonzero().squeeze(1), _ExpertsView(self, trainable), rows)):
        if pairs.numel():
            unit = torch.ones(pairs.numel(), 1, dtype=hidden_states.dtype, device=pairs.device)
            pair_outputs[pairs] = grouped_mm_experts_forward(experts, hidden_states[pairs // top_k], ids[pairs, None], unit)
    weighted = pair_outputs * weights.unsqueeze(-1)  # promotes to the router weights' dtype, as the kernel does
    return weighted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(ESFT_EXPERTS, esft_experts_forward)


def prepare_esft(model: nn.Module, selection: ExpertSelection) -> nn.Module:
    """Freeze everything, then make the selected experts (and shared / non-expert modules if asked) trainable.

    `merge_esft` undoes it, restoring the experts implementation the model had.
    """
    model.requires_grad_(False)
    groups = split_parameters(model)
    parameters = dict(model.named_parameters())
    for group, wanted in (("shared", selection.shared_experts), ("non_expert", selection.non_expert_modules)):
        if wanted:
            for name in groups[group]:
                parameters[name].requires_grad_(True)
    for layer in moe_layers(model):
        if rows := selection.experts.get(layer.index):
            layer.experts.esft_rows = ExpertRows(layer.experts, rows)
    model.esft_previous_experts_implementation = model.config._experts_implementation
    model.set_experts_implementation(ESFT_EXPERTS)
    _disable_router_aux_loss(model)
    return model


@torch.no_grad()
def merge_esft(model: nn.Module) -> nn.Module:
    """Write the trained rows back into the fused Parameters and return to the standard kernel."""
    for layer in moe_layers(model):
        if (trainable := getattr(layer.experts, "esft_rows", None)) is not None:
            for name, weight in trainable.weights.items():
                getattr(layer.experts, name).index_copy_(0, trainable.index, weight.to(getattr(layer.experts, name).dtype))
            del layer.experts.esft_rows
    model.set_experts_implementation(getattr(model, "esft_previous_experts_implementation", "grouped_mm"))
    return model


def prepare_full(model: nn.Module) -> nn.Module:
    model.requires_grad_(True)
    _disable_router_aux_loss(model)
    return model


def prepare_lora(model: nn.Module, rank: int, alpha: int, targets: list[str], experts: bool) -> nn.Module:
    """PEFT LoRA on the given linear modules and, with `experts`, on every layer's fused expert tensors."""
    from peft import LoraConfig, get_peft_model

    _disable_router_aux_loss(model)
    target_modules = _all_linear_but_routers(model) if targets == ["all-linear"] else targets
    target_parameters = None
    if experts:
        target_parameters = sorted({
            f"{layer.prefix}.experts.{name}"
            for layer in moe_layers(model)
            for name, _ in layer.experts.named_parameters(recurse=False)
            if name in ("gate_up_proj", "down_proj")
        })
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules,
                        target_parameters=target_parameters, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _all_linear_but_routers(model: nn.Module) -> list[str]:
    """PEFT's `all-linear` (every linear layer but the output head) without the routers and the routed experts.

    A LoRA router would move tokens to other experts, which no baseline in the paper does, and routed experts get
    LoRA through `experts=True` only, so `--no-lora-experts` leaves every one of them untouched. Linear layers named
    like a transformers-v4 expert projection (the dense and shared-expert MLPs' gate_proj / up_proj / down_proj) are
    left out too: PEFT rewrites any such target into the routed experts' fused tensors (huggingface/peft#3711).
    """
    layers = moe_layers(model)
    excluded = {id(module) for layer in layers for owner in (layer.router, layer.experts) for module in owner.modules()}
    excluded.add(id(model.get_output_embeddings()))
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and id(module) not in excluded
                  and name.rsplit(".", 1)[-1] not in _PEFT_REWRITTEN_NAMES)


_PEFT_REWRITTEN_NAMES = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


def _disable_router_aux_loss(model: nn.Module) -> None:
    """The load-balancing loss would train the router; ESFT keeps routing as the base model does."""
    model.config.output_router_logits = False


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
