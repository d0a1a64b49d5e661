"""One precision policy: every method trains float32 master weights of a bfloat16 model and computes in bfloat16;
`--pure-bf16` trains bfloat16 weights and AdamW state, as the reference does."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from expert_hub import ExpertAdapter, ExpertSelection
from expert_hub.errors import InvalidInputError
from expert_hub.models import load_base
from expert_hub.testing import build_tiny_model
from expert_hub.training import train
from expert_hub.training.methods import prepare_full, trainable_parameters
from expert_hub.training.precision import drop_float32_masters, keep_float32_masters

from .test_training import _config

pytestmark = pytest.mark.slow  # whole training runs: `make test-fast` leaves it out


def test_masters_compute_what_the_bfloat16_model_computes_and_drop_back_to_it(tmp_path):
    """Tied embeddings keep one master; the forward is bit-identical; dropping the masters gives the model back."""
    base = build_tiny_model("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    model = load_base(str(base), dtype=torch.bfloat16)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    input_ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids).logits

    prepare_full(model)
    assert keep_float32_masters(model) == len(trainable_parameters(model))  # one per parameter, tied ones once
    assert {p.dtype for p in trainable_parameters(model).values()} == {torch.float32}
    model(input_ids, labels=input_ids).loss.backward()
    assert {p.grad.dtype for p in trainable_parameters(model).values()} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected)

    drop_float32_masters(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


def _changed_share(run, base) -> float:
    """The share of the base's projection and expert weights the shipped full fine-tuned model changed (the
    embedding rows of unused tokens and the norms, near 1.0, move in neither run)."""
    trained = load_base(str(run.artifact), dtype=torch.bfloat16).state_dict()
    original = load_base(str(base), dtype=torch.bfloat16).state_dict()
    keys = [k for k in original if "proj" in k]
    return sum(int((trained[k] != original[k]).sum()) for k in keys) / sum(original[k].numel() for k in keys)


def test_small_steps_add_up_in_float32_masters_and_round_away_in_pure_bf16(tiny_models, tmp_path, esft_data):
    """Full fine-tuning of a bfloat16 model with steps below bfloat16's resolution: the float32 masters move the
    shipped weights, pure bfloat16 (the reference's way) loses most steps to rounding."""
    data = esft_data / "datasets/train/law.jsonl"
    settings = dict(method="full", dtype="bfloat16", steps=6, save_every=3, learning_rate=1e-4, weight_decay=0.0)
    masters = train(_config(tiny_models["qwen3_moe"], data, tmp_path / "masters", **settings))
    pure = train(_config(tiny_models["qwen3_moe"], data, tmp_path / "pure", pure_bf16=True, **settings))

    assert _changed_share(masters, tiny_models["qwen3_moe"]) > 0.5
    assert _changed_share(pure, tiny_models["qwen3_moe"]) < 0.5 * _changed_share(masters, tiny_models["qwen3_moe"])
    for run, dtype in ((masters, torch.float32), (pure, torch.bfloat16)):  # weights and AdamW state
        checkpoint = run.artifact.parent / "checkpoints" / "step-000006"
        assert {t.dtype for t in load_file(checkpoint / "trainable.safetensors").values()} == {dtype}
        optimizer = load_file(checkpoint / "optimizer.safetensors")
        assert {t.dtype for key, t in optimizer.items() if "exp_avg" in key} == {dtype}


@pytest.mark.parametrize("method", ["full", "esft"])
def test_a_bfloat16_run_with_masters_resumes_exactly(tiny_models, tmp_path, esft_data, method):
    data = esft_data / "datasets/train/law.jsonl"
    experts = tmp_path / "cfg.json"
    ExpertSelection({1: [0, 3], 2: [5]}, shared_experts=True).save(experts)
    settings = dict(method=method, dtype="bfloat16", steps=6, save_every=3, keep="last")
    if method == "esft":
        settings["experts"] = str(experts)
    whole = train(_config(tiny_models["deepseek_v2"], data, tmp_path / "whole", **settings))
    train(_config(tiny_models["deepseek_v2"], data, tmp_path / "split", **(settings | {"steps": 3})))
    resumed = train(_config(tiny_models["deepseek_v2"], data, tmp_path / "split", **settings))
    assert resumed.resumed_from == 3
    if method == "full":
        first, second = (load_base(str(run.artifact)).state_dict() for run in (whole, resumed))
    else:
        first, second = (ExpertAdapter.load(run.artifact).tensors for run in (whole, resumed))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_pure_bf16_trains_expert_rows_in_bfloat16(tiny_models, tmp_path, esft_data):
    result = train(
        _config(
            tiny_models["qwen3_moe"],
            esft_data / "datasets/train/law.jsonl",
            tmp_path / "run",
            pure_bf16=True,
            steps=2,
            save_every=2,
        )
    )
    checkpoint = result.artifact.parent / "checkpoints" / "step-000002"
    assert {t.dtype for t in load_file(checkpoint / "trainable.safetensors").values()} == {torch.bfloat16}
    assert result.model.dtype == torch.bfloat16


def test_pure_bf16_refuses_another_dtype():
    with pytest.raises(InvalidInputError, match="--pure-bf16 trains bfloat16 weights; it cannot use --dtype float32"):
        _config("base", "data.jsonl", "out", pure_bf16=True, dtype="float32")
    assert _config("base", "data.jsonl", "out", pure_bf16=True).dtype == "bfloat16"
