"""Family specs: routers and experts are found, and one expert's tensors are read and written faithfully."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from expert_hub.errors import UnsupportedModelError
from expert_hub.families import FAMILIES, moe_layers, read_expert, write_expert
from expert_hub.models import describe_model, load_base

# save_pretrained writes the original per-expert checkpoint keys: an independent oracle for the fused layout.
_MIXTRAL_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _checkpoint_tensor(checkpoint: dict, family: str, layer: int, expert: int, name: str) -> torch.Tensor:
    projection, kind = name.split(".")
    if family == "mixtral":
        return checkpoint[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL_NAMES[projection]}.{kind}"]
    return checkpoint[f"model.layers.{layer}.mlp.experts.{expert}.{name}"]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])
def test_expert_tensors_match_the_per_expert_checkpoint(tiny_models, family):
    checkpoint = load_file(tiny_models[family] / "model.safetensors")
    model = load_base(str(tiny_models[family]))
    for layer in moe_layers(model):
        for expert in range(layer.num_experts):
            tensors = read_expert(layer.experts, expert)
            assert set(tensors) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
            for name, tensor in tensors.items():
                assert torch.equal(tensor, _checkpoint_tensor(checkpoint, family, layer.index, expert, name)), name


def test_gpt_oss_expert_tensors_compute_the_expert(tiny_models):
    """gpt_oss interleaves gate/up columns and transposes: rebuild one expert from its tensors and compare."""
    model = load_base(str(tiny_models["gpt_oss"]))
    layer = moe_layers(model)[1]
    tensors = read_expert(layer.experts, 3)
    x = torch.randn(5, model.config.hidden_size)
    gate = torch.nn.functional.linear(x, tensors["gate_proj.weight"], tensors["gate_proj.bias"])
    up = torch.nn.functional.linear(x, tensors["up_proj.weight"], tensors["up_proj.bias"])
    gate_up = torch.stack([gate, up], dim=-1).flatten(-2)  # re-interleave for the module's own activation
    expected = torch.nn.functional.linear(
        layer.experts._apply_gate(gate_up), tensors["down_proj.weight"], tensors["down_proj.bias"]
    )
    routed = layer.experts(x, torch.full((5, 1), 3), torch.ones(5, 1))
    torch.testing.assert_close(routed, expected)


def test_write_expert_changes_exactly_that_expert(tiny_models, family):
    model = load_base(str(tiny_models[family]))
    layer = moe_layers(model)[-1]
    before = [read_expert(layer.experts, e) for e in range(layer.num_experts)]
    new = {name: torch.randn_like(tensor) for name, tensor in before[2].items()}
    write_expert(layer.experts, 2, new)
    for expert in range(layer.num_experts):
        after = read_expert(layer.experts, expert)
        expected = new if expert == 2 else before[expert]
        assert all(torch.equal(after[name], expected[name]) for name in expected)


def test_describe_model_matches_the_loaded_model(tiny_models, family):
    summary = describe_model(str(tiny_models[family]))
    layers = moe_layers(load_base(str(tiny_models[family])))
    assert summary.family == family
    assert summary.moe_layers == [layer.index for layer in layers]
    assert (summary.num_experts, summary.top_k) == (8, 2)
    assert summary.shared_experts == (family in ("deepseek_v2", "deepseek_v3", "qwen2_moe"))
    assert summary.expert_biases == (family == "gpt_oss")


def test_dense_model_is_refused_naming_the_supported_families(tmp_path, run_cli):
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    with pytest.raises(UnsupportedModelError, match="llama.*deepseek_v2.*gpt_oss.*qwen3_moe"):
        load_base(str(tmp_path / "dense"))
    with pytest.raises(UnsupportedModelError):
        moe_layers(AutoModelForCausalLM.from_config(config))
    code, _, err = run_cli("inspect", tmp_path / "dense")
    assert code == 1 and err.startswith("error: model type 'llama' is not a supported") and err.count("\n") == 1
