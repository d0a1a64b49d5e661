"""The Mixture-of-Experts families expert-hub supports, and where each keeps its routers and experts.

Everything family-specific lives here; the rest of the package asks `moe_layers(model)` and works on
`MoELayer`s. The fused expert tensors' layout is read from the experts module itself (see `layout.py`); the
checkpoint names of one expert's tensors are spelled in `keys.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

from torch import nn

from ..errors import UnsupportedModelError
from .keys import ExpertKey, canonical_key, expert_checkpoint_key, expert_key, parse_expert_key
from .layout import FUSED_TENSOR, PROJECTIONS, FusedLayout, expert_view_in, expert_views, read_expert, write_expert

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer

__all__ = [
    "FAMILIES",
    "FUSED_TENSOR",
    "PROJECTIONS",
    "ExpertKey",
    "MoEFamily",
    "MoELayer",
    "canonical_key",
    "expert_checkpoint_key",
    "expert_view_in",
    "expert_views",
    "family_of",
    "moe_layers",
    "parse_expert_key",
    "read_expert",
    "split_parameters",
    "write_expert",
]


@dataclass(frozen=True)
class MoEFamily:
    """Where one family's MoE block keeps its parts (attribute names on `model.layers[i].mlp`)."""

    model_type: str
    router: str = "gate"
    shared_experts: tuple[str, ...] = ()
    # The router attribute its top-k weights were multiplied by (DeepSeek-V3: 2.5). The Average Gate Score
    # divides it out, so it is the router's own weight. Routers that renormalise the top-k (norm_topk_prob,
    # mixtral, gpt_oss) give gate scores summing to 1 per layer; DeepSeek-V2-Lite's do not (about 0.35-0.40).
    gate_scale: str | None = None
    # How the family's checkpoints name the MoE block and an expert's projections where transformers renames them on
    # load (Mixtral's `block_sparse_moe.experts.E.w1/w3/w2`); the merged checkpoint must keep the base's own names.
    checkpoint_block: str = "mlp"
    checkpoint_projections: tuple[str, str, str] = PROJECTIONS

    def checkpoint_key(self, model_key: str) -> str:
        """`model_key` (a parameter name, or a per-expert key as adapters spell it) as this family's checkpoints
        spell it; the same key for every family but Mixtral."""
        if self.checkpoint_block == "mlp" and self.checkpoint_projections == PROJECTIONS:
            return model_key
        parsed = parse_expert_key(model_key)
        if parsed is None:
            return model_key.replace(".mlp.", f".{self.checkpoint_block}.", 1)
        projection, kind = parsed.tensor.split(".")
        block = f"{parsed.prefix.removesuffix('.mlp')}.{self.checkpoint_block}"
        renamed = dict(zip(PROJECTIONS, self.checkpoint_projections))[projection]
        return expert_key(block, parsed.expert, f"{renamed}.{kind}")


_DEEPSEEK_V2 = MoEFamily("deepseek_v2", shared_experts=("shared_experts",), gate_scale="routed_scaling_factor")

FAMILIES: dict[str, MoEFamily] = {
    family.model_type: family
    for family in (
        _DEEPSEEK_V2,
        replace(_DEEPSEEK_V2, model_type="deepseek_v3"),
        MoEFamily("qwen2_moe", shared_experts=("shared_expert", "shared_expert_gate")),
        MoEFamily("qwen3_moe"),
        MoEFamily("olmoe"),
        MoEFamily("mixtral", checkpoint_block="block_sparse_moe", checkpoint_projections=("w1", "w3", "w2")),
        MoEFamily("gpt_oss", router="router"),
    )
}


@dataclass(frozen=True)
class MoELayer:
    """One decoder layer's MoE block. `prefix` is the block's state-dict name, e.g. `model.layers.3.mlp`."""

    index: int
    prefix: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    family: MoEFamily

    @property
    def num_experts(self) -> int:
        return cast(FusedLayout, self.experts).gate_up_proj.shape[0]

    @property
    def top_k(self) -> int:
        return cast(int, self.router.top_k)  # a plain attribute, which nn.Module types as Tensor | Module

    @property
    def gate_scale(self) -> float:
        return float(getattr(self.router, self.family.gate_scale)) if self.family.gate_scale else 1.0

    def expert_key(self, expert: int, tensor: str) -> str:
        """The per-expert checkpoint key, e.g. `model.layers.3.mlp.experts.5.gate_proj.weight`."""
        return expert_key(self.prefix, expert, tensor)

    def shared_expert_modules(self) -> dict[str, nn.Module]:
        return {f"{self.prefix}.{name}": getattr(self.block, name) for name in self.family.shared_experts}


def family_of(config) -> MoEFamily:
    """The family spec for a transformers config; a clear error for dense or unknown models."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a supported Mixture-of-Experts family (supported: {supported})"
        )
    return FAMILIES[model_type]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of a transformers causal LM, in layer order (dense layers are skipped).

    With PEFT LoRA on the experts (a `ParamWrapper` around them), `experts` is the wrapped experts module.
    """
    family = family_of(model.config)
    names = {id(module): name for name, module in model.named_modules()}
    layers = []
    # The casts name what transformers keeps in these attributes, which nn.Module types as Tensor | Module.
    decoder = cast(nn.Module, model.base_model)
    for index, decoder_layer in enumerate(cast(nn.ModuleList, decoder.layers)):
        block = cast(nn.Module, decoder_layer.mlp)
        if not hasattr(block, "experts"):
            continue
        wrapped = cast(nn.Module, block.experts)
        experts = cast("BaseTunerLayer", wrapped).get_base_layer() if hasattr(wrapped, "get_base_layer") else wrapped
        if not hasattr(experts, "gate_up_proj"):
            raise UnsupportedModelError(
                f"{type(experts).__name__} does not hold fused expert tensors: expert-hub needs the "
                "transformers implementation of this family (drop trust_remote_code)"
            )
        layers.append(
            MoELayer(
                index=index,
                prefix=names[id(block)],
                block=block,
                router=getattr(block, family.router),
                experts=experts,
                family=family,
            )
        )
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no MoE layers")
    return layers


def split_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names grouped the way ESFT sees them: `routed` experts, `shared` experts, `non_expert`.

    Routers count as non-expert modules, as in the reference code.
    """
    layers = moe_layers(model)
    routed = tuple(f"{layer.prefix}.experts." for layer in layers)
    shared = tuple(f"{name}." for layer in layers for name in layer.shared_expert_modules())
    groups: dict[str, list[str]] = {"routed": [], "shared": [], "non_expert": []}
    for name, _ in model.named_parameters():
        group = "routed" if name.startswith(routed) else "shared" if name.startswith(shared) else "non_expert"
        groups[group].append(name)
    return groups
