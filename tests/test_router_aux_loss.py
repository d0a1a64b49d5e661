"""--router-aux-loss: DeepSeek-V2's auxiliary loss as the reference computes it, transformers' own elsewhere."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from expert_hub import ExpertAdapter, ExpertSelection
from expert_hub.errors import InvalidInputError
from expert_hub.families import moe_layers
from expert_hub.models import load_base
from expert_hub.testing import build_tiny_model
from expert_hub.training import train
from expert_hub.training.aux_loss import RouterAuxLoss

from .reference import reference_code
from .test_training import _config


@pytest.mark.parametrize(
    ("topk_method", "seq_aux"), [("greedy", True), ("greedy", False), ("group_limited_greedy", True)]
)
def test_deepseek_v2_aux_loss_is_the_reference_moe_gate_s(tmp_path, topk_method, seq_aux):
    """The loss added to a training forward is the sum over layers of the reference `MoEGate`'s `aux_loss` (its
    `deepseek/modeling_deepseek.py`)."""
    groups = dict(n_group=4, topk_group=2) if topk_method == "group_limited_greedy" else {}
    path = build_tiny_model("deepseek_v2", tmp_path / "model", topk_method=topk_method, seq_aux=seq_aux, **groups)
    model = load_base(str(path)).train()
    gate_inputs = []
    for layer in moe_layers(model):
        layer.router.register_forward_hook(lambda module, inputs, output: gate_inputs.append((module, inputs[0])))
    input_ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))

    lm_loss, aux_loss = RouterAuxLoss(model, coefficient=0.01).losses(model, input_ids=input_ids, labels=input_ids)

    assert torch.equal(lm_loss, model(input_ids=input_ids, labels=input_ids).loss)
    reference_gate = reference_code("deepseek/modeling_deepseek.py", "MoEGate").MoEGate
    reference_config = SimpleNamespace(**model.config.to_dict() | dict(scoring_func="softmax", aux_loss_alpha=0.01))
    expected = 0.0
    for router, hidden_states in gate_inputs[: len(moe_layers(model))]:
        reference = reference_gate(reference_config)
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
