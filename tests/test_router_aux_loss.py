"""--router-aux-loss: DeepSeek-V2's auxiliary loss as the reference computes it, transformers' own elsewhere."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from expert_hub import ExpertAdapter, ExpertSelection
from expert_hub.errors import InvalidInputError
from expert_hub.families import moe_layers
from expert_hub.models import load_base
from expert_hub.testing import build_tiny_model
from expert_hub.training import train
from expert_hub.training.aux_loss import RouterAuxLoss

from .test_training import _config


class ReferenceMoEGate(nn.Module):
    """deepseek-ai/ESFT `deepseek/modeling_deepseek.py` `MoEGate`, copied verbatim (but `reset_parameters`)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.topk_method = config.topk_method
        self.n_group = config.n_group
        self.topk_group = config.topk_group

        # topk selection algorithm
        self.norm_topk_prob = config.norm_topk_prob
        self.gating_dim = config.hidden_size
        self.weight = nn.Parameter(torch.empty((self.n_routed_experts, self.gating_dim)))

    def forward(self, hidden_states):
        bsz, seq_len, h = hidden_states.shape
        ### compute gating score
        hidden_states = hidden_states.view(-1, h)
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
        if self.scoring_func == "softmax":
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        else:
            raise NotImplementedError(f"insupportable scoring function for MoE gating: {self.scoring_func}")

        ### select top-k experts
        if self.topk_method == "greedy":
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(bsz * seq_len, self.n_group, -1).max(dim=-1).values  # [n, n_group]
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]  # [n, top_k_group]
            group_mask = torch.zeros_like(group_scores)  # [n, n_group]
            group_mask.scatter_(1, group_idx, 1)  # [n, n_group]
            score_mask = (
                group_mask.unsqueeze(-1)
                .expand(bsz * seq_len, self.n_group, self.n_routed_experts // self.n_group)
                .reshape(bsz * seq_len, -1)
            )  # [n, e]
            tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)  # [n, e]
            topk_weight, topk_idx = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)

        ### norm gate to sum 1
        if self.top_k > 1 and self.norm_topk_prob:
            denominator = topk_weight.sum(dim=-1, keepdim=True) + 1e-20
            topk_weight = topk_weight / denominator
        else:
            topk_weight = topk_weight * self.routed_scaling_factor
        ### expert-level computation auxiliary loss
        if self.training and self.alpha > 0.0:
            scores_for_aux = scores
            aux_topk = self.top_k
            # always compute aux loss based on the naive greedy topk method
            topk_idx_for_aux_loss = topk_idx.view(bsz, -1)
            if self.seq_aux:
                scores_for_seq_aux = scores_for_aux.view(bsz, seq_len, -1)
                ce = torch.zeros(bsz, self.n_routed_experts, device=hidden_states.device)
                ce.scatter_add_(
                    1, topk_idx_for_aux_loss, torch.ones(bsz, seq_len * aux_topk, device=hidden_states.device)
                ).div_(seq_len * aux_topk / self.n_routed_experts)
                aux_loss = (ce * scores_for_seq_aux.mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:
                mask_ce = F.one_hot(topk_idx_for_aux_loss.view(-1), num_classes=self.n_routed_experts)
                ce = mask_ce.float().mean(0)
                Pi = scores_for_aux.mean(0)
                fi = ce * self.n_routed_experts
                aux_loss = (Pi * fi).sum() * self.alpha
        else:
            aux_loss = None
        return topk_idx, topk_weight, aux_loss


@pytest.mark.parametrize(
    ("topk_method", "seq_aux"), [("greedy", True), ("greedy", False), ("group_limited_greedy", True)]
)
def test_deepseek_v2_aux_loss_is_the_reference_moe_gate_s(tmp_path, topk_method, seq_aux):
    """The loss added to a training forward is the sum over layers of the reference `MoEGate`'s `aux_loss`."""
    groups = dict(n_group=4, topk_group=2) if topk_method == "group_limited_greedy" else {}
    path = build_tiny_model("deepseek_v2", tmp_path / "model", topk_method=topk_method, seq_aux=seq_aux, **groups)
    model = load_base(str(path)).train()
    gate_inputs = []
    for layer in moe_layers(model):
        layer.router.register_forward_hook(lambda module, inputs, output: gate_inputs.append((module, inputs[0])))
    input_ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))

    lm_loss, aux_loss = RouterAuxLoss(model, coefficient=0.01).losses(model, input_ids=input_ids, labels=input_ids)

    assert torch.equal(lm_loss, model(input_ids=input_ids, labels=input_ids).loss)
    expected = 0.0
    for router, hidden_states in gate_inputs[: len(moe_layers(model))]:
        reference_config = SimpleNamespace(**model.config.to_dict() | dict(scoring_func="softmax", aux_loss_alpha=0.01))
        reference = ReferenceMoEGate(reference_config)
        reference.weight.data.copy_(router.weight.data)
        topk_idx, _, reference_aux = reference.train()(hidden_states)
        assert torch.equal(topk_idx.sort(-1).values, router(hidden_states)[2].sort(-1).values)
        expected = expected + reference_aux
    torch.testing.assert_close(aux_loss, expected, rtol=1e-6, atol=0)
    assert aux_loss.requires_grad


def test_other_families_use_transformers_own_aux_loss(tiny_models):
    """What the model itself would add with `output_router_logits` is what is added (as a separate term)."""
    input_ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model = load_base(str(tiny_models["qwen3_moe"])).train()
    with torch.no_grad():
        plain = model(input_ids=input_ids, labels=input_ids).loss
        with_its_own = model(input_ids=input_ids, labels=input_ids, output_router_logits=True).loss
        aux = RouterAuxLoss(model)
        lm_loss, aux_loss = aux.losses(model, input_ids=input_ids, labels=input_ids)
    assert aux.coefficient == model.config.router_aux_loss_coef
    assert torch.equal(lm_loss, plain)
    torch.testing.assert_close(lm_loss + aux_loss, with_its_own)
    aux.remove()
    assert model.config.output_router_logits is False and model.router_aux_loss_coef == aux.coefficient


def test_the_coefficient_comes_from_the_config_unless_given(tmp_path):
    plain = load_base(str(build_tiny_model("deepseek_v2", tmp_path / "plain")))
    assert RouterAuxLoss(plain).coefficient == 0.001  # the original DeepseekV2Config's default
    alpha = load_base(str(build_tiny_model("deepseek_v2", tmp_path / "alpha", aux_loss_alpha=0.003)))
    assert RouterAuxLoss(alpha).coefficient == 0.003
    assert RouterAuxLoss(alpha, coefficient=0.5).coefficient == 0.5


def test_families_without_an_aux_loss_are_refused_before_anything_is_written(tiny_models, tmp_path, esft_data):
    """Refused before the run directory is claimed: the same --out then works without the flag."""
    config = _config(
        tiny_models["deepseek_v3"], esft_data / "datasets/train/law.jsonl", tmp_path / "run", router_aux_loss=True
    )
    with pytest.raises(InvalidInputError, match="deepseek_v3 has no router auxiliary loss of its own"):
        train(config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(InvalidInputError, match="--router-aux-loss-coef needs --router-aux-loss"):
        _config("base", "data.jsonl", "out", router_aux_loss_coef=0.1)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_baselines_train_with_the_aux_loss(tiny_models, tmp_path, esft_data, method):
    settings = dict(method=method, steps=2, save_every=2, router_aux_loss=True, gradient_checkpointing=True)
    data = esft_data / "datasets/train/law.jsonl"
    result = train(_config(tiny_models["deepseek_v2"], data, tmp_path / "run", **settings))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(entry["aux_loss"] > 0 for entry in log) and math.isfinite(result.train_loss)
    assert result.model.config.output_router_logits is False


def test_training_with_the_aux_loss_moves_the_experts_that_feed_the_routers(tiny_models, tmp_path, esft_data):
    """ESFT keeps the routers frozen; the loss trains the experts before them. Gradient checkpointing's second pass
    through the routers adds nothing; the log reports the auxiliary loss apart from the language-model loss."""
    data = esft_data / "datasets/train/law.jsonl"
    experts = tmp_path / "cfg.json"
    ExpertSelection({1: [0, 3], 2: [5]}).save(experts)
    settings = dict(method="esft", experts=str(experts), steps=3, save_every=3, keep="last")
    runs = {
        name: train(_config(tiny_models["deepseek_v2"], data, tmp_path / name, **settings, **extra))
        for name, extra in (
            ("plain", {}),
            ("aux", dict(router_aux_loss=True, router_aux_loss_coef=1.0)),
            ("aux_checkpointed", dict(router_aux_loss=True, router_aux_loss_coef=1.0, gradient_checkpointing=True)),
        )
    }
    tensors = {name: ExpertAdapter.load(run.artifact).tensors for name, run in runs.items()}
    layer_1 = [key for key in tensors["plain"] if ".layers.1." in key]
    assert not all(torch.equal(tensors["plain"][k], tensors["aux"][k]) for k in layer_1)
    for key in tensors["aux"]:
        torch.testing.assert_close(tensors["aux"][key], tensors["aux_checkpointed"][key])
    assert runs["plain"].train_loss == pytest.approx(runs["aux"].train_loss, rel=0.05)  # the LM loss alone
    log = [json.loads(line) for line in (tmp_path / "aux" / "log.jsonl").read_text().splitlines()]
    assert all(entry["aux_loss"] > 0 and math.isfinite(entry["aux_loss"]) for entry in log)
    adapter = ExpertAdapter.load(runs["aux"].artifact)
    assert adapter.metadata.training["config"]["router_aux_loss"] is True
