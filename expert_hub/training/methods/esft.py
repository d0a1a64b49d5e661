"""ESFT: train only the experts a task uses, ship them as an expert adapter.

Only the selected experts train. Their rows are copied into a small trainable `ExpertRows` module beside the
frozen fused Parameters, and an experts implementation registered with transformers (`esft`) sends each
token-expert pair to one or the other: two grouped matmuls, the frozen one computing no weight gradients. So
gradients, optimizer state and weight decay touch only the selected rows, and the base stays bit-identical.
`shared_experts` / `non_expert_modules` in the selection unfreeze those modules too.

Three methods: `esft-token` and `esft-gate` score the task data and select experts with top-p (Token Selection
Ratio / Average Gate Score); `esft` trains the experts of a given `expert_cfg.json`.
"""

from __future__ import annotations

import shutil
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, cast

import torch
from accelerate.utils import broadcast_object_list
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

from ...adapter import CONFIG_FILE, AdapterMetadata, ExpertAdapter, fingerprint_selection
from ...auto_routing import PROFILE_FILE, RoutingProfile, profile_conversations
from ...data import load_conversations
from ...errors import InvalidInputError
from ...families import expert_views, moe_layers, split_parameters
from ...models import load_base
from ...routing import score_model, token_sequences
from ...scores import ScoreFunction
from ...selection import DEFAULT_TOP_P, ExpertSelection, select_experts
from .base import RunContext, TrainingMethod, disable_router_aux_loss, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ESFT_EXPERTS = "esft"


class ExpertRows(nn.Module):
    """Trainable copies of some experts' rows of a fused experts module, with the id -> row map.

    The rows are float32 master weights whatever the model's dtype (`training/precision.py`), unless `dtype` says
    otherwise (`--pure-bf16`). The forward casts them to the model's dtype, so it computes what the merged model
    computes.
    """

    index: torch.Tensor  # the buffers registered below
    position: torch.Tensor

    def __init__(self, experts: nn.Module, rows: list[int], dtype: torch.dtype = torch.float32):
        super().__init__()
        gate_up_proj = cast(torch.Tensor, experts.gate_up_proj)  # a Parameter, which nn.Module types as Tensor | Module
        index = torch.tensor(rows, dtype=torch.long, device=gate_up_proj.device)
        position = torch.full((gate_up_proj.shape[0],), -1, dtype=torch.long, device=index.device)
        position[index] = torch.arange(len(rows), device=index.device)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("position", position, persistent=False)  # expert id -> row here, -1 if frozen
        self.weights = nn.ParameterDict(
            {
                name: nn.Parameter(fused.detach()[index].to(dtype))
                for name, fused in experts.named_parameters(recurse=False)
            }
        )


class _MergedRows:
    """An experts module's layout over trained rows alone: `expert_views(self, row)` is that expert as merged."""

    def __init__(self, experts: nn.Module, rows: dict[str, torch.Tensor]):
        self._experts, self._rows = experts, rows

    def __getattr__(self, name: str):
        rows = self.__dict__["_rows"]
        return rows[name] if name in rows else getattr(self.__dict__["_experts"], name)


class _ExpertsView:
    """What `grouped_mm_experts_forward` reads from an experts module, over the trainable rows."""

    def __init__(self, experts: nn.Module, rows: ExpertRows):
        self.__dict__.update({name: weight.to(experts.gate_up_proj.dtype) for name, weight in rows.weights.items()})
        self.num_experts = len(rows.index)
        self.has_gate, self.has_bias, self.is_transposed = experts.has_gate, experts.has_bias, experts.is_transposed
        self._apply_gate, self.act_fn = experts._apply_gate, getattr(experts, "act_fn", None)
        self._is_expert_parallel = False


def esft_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
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
    for pairs, experts, ids in (
        ((~selected).nonzero().squeeze(1), self, expert_ids),
        (selected.nonzero().squeeze(1), _ExpertsView(self, trainable), rows),
    ):
        if pairs.numel():
            unit = torch.ones(pairs.numel(), 1, dtype=hidden_states.dtype, device=pairs.device)
            pair_outputs[pairs] = grouped_mm_experts_forward(
                # transformers annotates this nn.Module, but the kernel only reads attributes, which _ExpertsView has
                experts,  # type: ignore[arg-type]
                hidden_states[pairs // top_k],
                ids[pairs, None],
                unit,
            )
    weighted = pair_outputs * weights.unsqueeze(-1)  # promotes to the router weights' dtype, as the kernel does
    return weighted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(ESFT_EXPERTS, esft_experts_forward)


def prepare_esft(
    model: PreTrainedModel, selection: ExpertSelection, rows_dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
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
            layer.experts.esft_rows = ExpertRows(layer.experts, rows, rows_dtype)
    model.esft_previous_experts_implementation = model.config._experts_implementation
    model.set_experts_implementation(ESFT_EXPERTS)
    disable_router_aux_loss(model)
    return model


@torch.no_grad()
def merge_esft(model: PreTrainedModel) -> PreTrainedModel:
    """Write the trained rows back into the fused Parameters and return to the standard kernel."""
    for layer in moe_layers(model):
        if (trainable := getattr(layer.experts, "esft_rows", None)) is not None:
            for name, weight in trainable.weights.items():
                getattr(layer.experts, name).index_copy_(
                    0, trainable.index, weight.to(getattr(layer.experts, name).dtype)
                )
            del layer.experts.esft_rows
    model.set_experts_implementation(getattr(model, "esft_previous_experts_implementation", "grouped_mm"))
    return model


class _ESFT(TrainingMethod):
    """What the three ESFT methods share: they differ only in how the experts are chosen (`select`)."""

    artifact_file = CONFIG_FILE
    ships_expert_adapter = True
    shardable = True

    @abstractmethod
    def select(self, model: PreTrainedModel, run: RunContext) -> ExpertSelection:
        """The experts to train."""

    def prepare(self, model: PreTrainedModel, run: RunContext) -> PreTrainedModel:
        self.selection = self.select(model, run)
        self.fingerprint = fingerprint_selection(model, self.selection)  # of the base rows, before any step
        if self.config.sharding == "fsdp" and (self.selection.shared_experts or self.selection.non_expert_modules):
            raise InvalidInputError(
                "--sharding fsdp trains routed experts only, and this selection also trains shared experts or "
                "non-expert modules; use --sharding ddp"
            )
        self.profile = run.out / PROFILE_FILE
        if run.accelerator.is_main_process and not self.profile.is_file():
            run.status("Profiling the routing of the task's prompts (for auto routing)")
            self._profile_prompts(model, run).save(run.out)
        return prepare_esft(model, self.selection, model.dtype if self.config.pure_bf16 else torch.float32)

    def _profile_prompts(self, model: PreTrainedModel, run: RunContext) -> RoutingProfile:
        """How the base routes the prompts of (a seeded sample of) the task data: what a request for it looks like."""
        config = self.config
        conversations = load_conversations(config.data, config.split, seed=config.seed)
        return profile_conversations(
            model, run.tokenizer, conversations, chat_template=config.chat_template, max_tokens=config.seq_len
        )

    def finish(self, model: nn.Module) -> nn.Module:
        return merge_esft(cast("PreTrainedModel", model))  # the model `prepare` returned

    def _with_profile(self, adapter: Path) -> Path:
        """The adapter, with the routing profile of its task's prompts beside the experts."""
        shutil.copyfile(self.profile, adapter / PROFILE_FILE)
        return adapter

    def write_artifact(self, model: nn.Module, path: Path, tokenizer, metadata: dict) -> Path:
        adapter = ExpertAdapter.from_model(model, self.selection, base_fingerprint=self.fingerprint, **metadata)
        return self._with_profile(adapter.save(path, overwrite=True))

    def write_sharded_artifact(
        self, model: nn.Module, trained: dict[str, torch.Tensor], path: Path, metadata: dict
    ) -> Path:
        """The adapter `write_artifact` writes, from the gathered rows: the sharded fused tensors cannot take them.

        Each row is cast to the model's dtype as `merge_esft` casts it, then cut into checkpoint tensors by the
        same `expert_views` that reads a merged model, so both adapters hold the same tensors.
        """
        names = {id(module): name for name, module in model.named_modules()}
        tensors: dict[str, torch.Tensor] = {}
        for layer in moe_layers(model):
            if (rows := getattr(layer.experts, "esft_rows", None)) is None:
                continue
            prefix = f"{names[id(rows)]}.weights"
            merged = _MergedRows(
                layer.experts,
                {name: trained[f"{prefix}.{name}"].to(getattr(layer.experts, name).dtype) for name in rows.weights},
            )
            for row, expert in enumerate(rows.index.tolist()):
                views = expert_views(merged, row)
                tensors |= {layer.expert_key(expert, key): view.contiguous().clone() for key, view in views.items()}
        revision = getattr(model.config, "_commit_hash", None)
        adapter_metadata = AdapterMetadata(base_fingerprint=self.fingerprint, base_revision=revision, **metadata)
        return self._with_profile(ExpertAdapter(self.selection, tensors, adapter_metadata).save(path, overwrite=True))

    @classmethod
    def load_artifact(cls, base: str, directory: Path, force: bool = False, **from_pretrained_kwargs) -> nn.Module:
        adapter = ExpertAdapter.load(directory)  # before loading weights: a bad adapter fails fast
        return adapter.apply(load_base(base, **from_pretrained_kwargs), force=force)


class _ScoredESFT(_ESFT):
    score_function: ClassVar[ScoreFunction]

    def select(self, model: PreTrainedModel, run: RunContext) -> ExpertSelection:
        """Score a seeded sample of the task data and select once, then keep the selection for resumes.

        Rank 0 scores and selects; the other ranks receive its selection, so every rank trains the same rows.
        """
        config, chosen = self.config, run.out / CONFIG_FILE
        # every rank reaches the broadcast, whichever way rank 0 gets the selection
        selection: list[ExpertSelection | None] = [None]
        if run.accelerator.is_main_process and chosen.is_file():
            selection = [ExpertSelection.load(chosen)]
        elif run.accelerator.is_main_process:
            run.status(f"Scoring experts on {config.score_tokens:,} task tokens")
            sequences = token_sequences(  # a sample of the whole data, drawn as the reference draws it
                load_conversations(config.data, config.split, seed=config.seed),
                run.tokenizer,
                max_tokens=config.score_tokens,
                max_length=config.seq_len,
            )
            source = {"model": config.base, "data": config.data, "seed": config.seed}
            scores = score_model(model, sequences, source=source)
            scores.save(run.out / "scores.json")
            selected = select_experts(scores, by=self.score_function, top_p=config.top_p)
            selection = [selected]
            selected.save(chosen)
        return broadcast_object_list(selection)[0]

    def artifact_metadata(self, summary: dict) -> dict:
        top_p = self.config.top_p or DEFAULT_TOP_P[self.score_function]
        return super().artifact_metadata(summary) | {"score_function": self.score_function, "top_p": top_p}


@register_method
class ESFTToken(_ScoredESFT):
    """ESFT-Token: experts chosen by Token Selection Ratio (the share of the task's tokens routed to them)."""

    name = "esft-token"
    score_function = "token"


@register_method
class ESFTGate(_ScoredESFT):
    """ESFT-Gate: experts chosen by Average Gate Score (the mean router weight they get)."""

    name = "esft-gate"
    score_function = "gate"


@register_method
class ESFTGiven(_ESFT):
    """ESFT on the experts of a given `expert_cfg.json` (`--experts`), e.g. one selected with `expert-hub select`."""

    name = "esft"

    @classmethod
    def check_config(cls, config) -> None:
        if not config.experts:
            raise InvalidInputError("--method esft needs --experts EXPERT_CFG.json (or use esft-token / esft-gate)")

    def select(self, model: PreTrainedModel, run: RunContext) -> ExpertSelection:
        assert self.config.experts is not None  # `check_config` refused a config without it
        return ExpertSelection.load(self.config.experts)
