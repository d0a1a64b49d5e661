"""Expert adapters: select -> adapter -> load_model puts exactly the selected experts in place."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from expert_hub import ExpertAdapter, ExpertSelection, checkpoint, load_model
from expert_hub.adapter import METADATA_FILE, fingerprint_selection
from expert_hub.checkpoint import checkpoint_fingerprint
from expert_hub.errors import AdapterMismatchError, InvalidInputError
from expert_hub.families import moe_layers, read_expert, split_parameters
from expert_hub.models import load_base
from expert_hub.testing import build_tiny_model


def _trained_adapter(base_dir, selection: ExpertSelection, seed: int = 1) -> ExpertAdapter:
    """An adapter whose tensors differ from the base, as training would leave them."""
    base = load_base(str(base_dir))
    adapter = ExpertAdapter.from_model(base, selection, task="law", method="esft-token")
    generator = torch.Generator().manual_seed(seed)
    adapter.tensors = {k: torch.randn(v.shape, generator=generator) for k, v in adapter.tensors.items()}
    return adapter


def _selection(model_dir) -> ExpertSelection:
    layers = moe_layers(load_base(str(model_dir)))
    return ExpertSelection({layers[0].index: [3, 0], layers[-1].index: [7]})


def _assert_only_adapter_changed(base, loaded, adapter: ExpertAdapter) -> None:
    selected = set(adapter.selection.pairs)
    for base_layer, layer in zip(moe_layers(base), moe_layers(loaded)):
        for expert in range(layer.num_experts):
            got = read_expert(layer.experts, expert)
            if (layer.index, expert) in selected:
                want = {name: adapter.tensors[layer.expert_key(expert, name)] for name in got}
            else:
                want = read_expert(base_layer.experts, expert)
            assert all(torch.equal(got[name], want[name]) for name in got), (layer.index, expert)
    routed = set(split_parameters(loaded)["routed"])
    base_tensors = dict(base.named_parameters()) | dict(base.named_buffers())
    for name, tensor in [*loaded.named_parameters(), *loaded.named_buffers()]:
        if name not in routed:
            assert torch.equal(tensor, base_tensors[name]), name


def test_load_model_puts_exactly_the_selected_experts_in_place(tiny_models, family, tmp_path):
    adapter = _trained_adapter(tiny_models[family], _selection(tiny_models[family]))
    adapter.save(tmp_path / "law")
    loaded = load_model(str(tiny_models[family]), tmp_path / "law")
    _assert_only_adapter_changed(load_base(str(tiny_models[family])), loaded, adapter)


def test_saved_adapter_gives_the_same_logits_as_the_model_it_came_from(tiny_models, tmp_path):
    base_dir = tiny_models["qwen3_moe"]
    adapter = _trained_adapter(base_dir, _selection(base_dir))
    in_memory = adapter.apply(load_base(str(base_dir)))
    adapter.save(tmp_path / "law")
    reloaded = load_model(str(base_dir), str(tmp_path / "law"))
    input_ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.equal(in_memory(input_ids).logits, reloaded(input_ids).logits)
        assert not torch.equal(load_base(str(base_dir))(input_ids).logits, reloaded(input_ids).logits)


def test_adapter_files_and_metadata(tiny_models, tmp_path):
    adapter = _trained_adapter(tiny_models["deepseek_v2"], ExpertSelection({1: [2], 3: [0, 5]}))
    adapter.save(tmp_path / "law")
    assert sorted(p.name for p in (tmp_path / "law").iterdir()) == [
        "expert_cfg.json",
        "expert_hub.json",
        "experts.safetensors",
    ]
    assert sorted(adapter.tensors) == sorted(
        f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"
        for layer, e in [(1, 2), (3, 0), (3, 5)]
        for p in ("gate", "up", "down")
    )
    metadata = json.loads((tmp_path / "law" / METADATA_FILE).read_text())
    assert metadata["task"] == "law" and metadata["base_model"] == str(tiny_models["deepseek_v2"])
    assert len(metadata["base_fingerprint"]) == 64 and "transformers" in metadata["versions"]
    assert adapter.nbytes == 3 * 3 * 32 * 64 * 4
    assert ExpertAdapter.load(tmp_path / "law").metadata == adapter.metadata


def test_wrong_base_is_refused_unless_forced(tiny_models, tmp_path):
    from expert_hub.testing import build_tiny_model

    other = build_tiny_model("qwen3_moe", tmp_path / "other", seed=7)
    adapter = _trained_adapter(tiny_models["qwen3_moe"], _selection(tiny_models["qwen3_moe"]))
    adapter.save(tmp_path / "law")
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        load_model(str(other), tmp_path / "law")
    forced = load_model(str(other), tmp_path / "law", force=True)
    _assert_only_adapter_changed(load_base(str(other)), forced, adapter)


def test_fingerprint_does_not_depend_on_the_load_dtype(tiny_models, tmp_path):
    _trained_adapter(tiny_models["mixtral"], _selection(tiny_models["mixtral"])).save(tmp_path / "law")
    model = load_model(str(tiny_models["mixtral"]), tmp_path / "law", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_keys_and_shapes_must_match_even_when_forced(tiny_models, tmp_path):
    adapter = _trained_adapter(tiny_models["qwen3_moe"], _selection(tiny_models["qwen3_moe"]))
    other_family = load_base(str(tiny_models["deepseek_v2"]))  # layer 0 is dense there
    with pytest.raises(AdapterMismatchError, match="model.layers.0.mlp.experts.3.gate_proj.weight"):
        adapter.apply(other_family, force=True)
    key = next(iter(adapter.tensors))
    adapter.tensors[key] = adapter.tensors[key][:-1]
    with pytest.raises(AdapterMismatchError, match="shape"):
        adapter.apply(load_base(str(tiny_models["qwen3_moe"])), force=True)
    out_of_range = ExpertAdapter(
        ExpertSelection({1: [8]}),
        {f"model.layers.1.mlp.experts.8.{p}_proj.weight": torch.zeros(1) for p in ("gate", "up", "down")},
    )
    with pytest.raises(AdapterMismatchError, match="experts.8"):
        out_of_range.apply(load_base(str(tiny_models["qwen3_moe"])), force=True)


def test_tensors_must_agree_with_the_selection(tiny_models, tmp_path):
    adapter = _trained_adapter(tiny_models["olmoe"], ExpertSelection({0: [1, 2]}))
    adapter.selection = ExpertSelection({0: [1]})
    adapter.save(tmp_path / "extra")
    with pytest.raises(InvalidInputError, match="does not select"):
        ExpertAdapter.load(tmp_path / "extra")
    adapter.selection = ExpertSelection({0: [1, 2, 4]})
    adapter.save(tmp_path / "missing")
    with pytest.raises(InvalidInputError, match="lacks weights for selected expert 4 of layer 0"):
        ExpertAdapter.load(tmp_path / "missing")


def test_shared_experts_travel_with_the_adapter(tiny_models, tmp_path):
    base_dir = tiny_models["qwen2_moe"]
    adapter = _trained_adapter(base_dir, ExpertSelection({1: [0]}, shared_experts=True))
    assert {"model.layers.1.mlp.shared_expert.gate_proj.weight", "model.layers.3.mlp.shared_expert_gate.weight"} <= set(
        adapter.tensors
    )
    adapter.save(tmp_path / "law")
    loaded = load_model(str(base_dir), tmp_path / "law")
    params = dict(loaded.named_parameters())
    for key in ("model.layers.1.mlp.shared_expert.gate_proj.weight", "model.layers.3.mlp.shared_expert_gate.weight"):
        assert torch.equal(params[key], adapter.tensors[key])
    assert torch.equal(
        params["model.layers.1.self_attn.q_proj.weight"],
        dict(load_base(str(base_dir)).named_parameters())["model.layers.1.self_attn.q_proj.weight"],
    )


def test_published_deepseek_layout_loads(tiny_models, tmp_path):
    """Sharded safetensors in bfloat16, no metadata, some keys with the legacy `layers.` prefix."""
    base_dir = tiny_models["deepseek_v2"]
    selection = ExpertSelection({1: [4, 6], 2: [0], 3: [7, 1]})
    adapter = _trained_adapter(base_dir, selection)
    published = tmp_path / "ESFT-token-law-lite"
    published.mkdir()
    keys = sorted(adapter.tensors)
    half = len(keys) // 2
    save_file(
        {k: adapter.tensors[k].to(torch.bfloat16) for k in keys[:half]}, published / "model-00001-of-00002.safetensors"
    )
    save_file(
        {k.removeprefix("model."): adapter.tensors[k].to(torch.bfloat16) for k in keys[half:]},
        published / "model-00002-of-00002.safetensors",
    )
    (published / "expert_cfg.json").write_text(
        json.dumps(
            {"experts": {"1": [4, 6], "2": [0], "3": [7, 1]}, "shared_experts": False, "non_expert_modules": False}
        )
    )
    (published / "config.json").write_text((base_dir / "config.json").read_text())
    loaded = load_model(str(base_dir), published)
    expected = ExpertAdapter(selection, {k: v.to(torch.bfloat16).float() for k, v in adapter.tensors.items()})
    _assert_only_adapter_changed(load_base(str(base_dir)), loaded, expected)


def test_saving_over_an_existing_adapter_needs_overwrite(tiny_models, tmp_path):
    first = _trained_adapter(tiny_models["mixtral"], ExpertSelection({0: [1]}), seed=1)
    second = _trained_adapter(tiny_models["mixtral"], ExpertSelection({2: [3]}), seed=2)
    first.save(tmp_path / "law")
    with pytest.raises(InvalidInputError, match="not empty"):
        second.save(tmp_path / "law")
    second.save(tmp_path / "law", overwrite=True)
    assert ExpertAdapter.load(tmp_path / "law").selection == second.selection
    assert [p.name for p in tmp_path.iterdir()] == ["law"]


def test_written_files_follow_the_umask(tiny_models, tmp_path):
    """Temporary files are private by default; the adapter others will serve must not be."""
    _trained_adapter(tiny_models["olmoe"], ExpertSelection({0: [1]})).save(tmp_path / "law")
    assert (tmp_path / "law").stat().st_mode & 0o777 == 0o777 & ~_umask()
    for path in (tmp_path / "law").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), path


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_adapter_missing_part_of_an_expert_is_refused(tiny_models, tmp_path):
    """gpt_oss experts have biases: weights alone would silently mix trained and base tensors."""
    adapter = _trained_adapter(tiny_models["gpt_oss"], ExpertSelection({1: [2]}))
    del adapter.tensors["model.layers.1.mlp.experts.2.up_proj.bias"]
    with pytest.raises(AdapterMismatchError, match="lacks model.layers.1.mlp.experts.2.up_proj.bias"):
        adapter.apply(load_base(str(tiny_models["gpt_oss"])))


def test_a_key_given_twice_across_shards_is_refused(tiny_models, tmp_path):
    adapter = _trained_adapter(tiny_models["deepseek_v2"], ExpertSelection({1: [2]}))
    adapter.save(tmp_path / "law")
    key = "model.layers.1.mlp.experts.2.gate_proj.weight"
    save_file({key.removeprefix("model."): adapter.tensors[key]}, tmp_path / "law" / "legacy.safetensors")
    with pytest.raises(InvalidInputError, match="holds model.layers.1.mlp.experts.2.gate_proj.weight twice"):
        ExpertAdapter.load(tmp_path / "law")


def test_malformed_metadata_is_refused(tiny_models, tmp_path):
    _trained_adapter(tiny_models["olmoe"], ExpertSelection({0: [1]})).save(tmp_path / "law")
    for bad in ("[1, 2]", '{"base_fingerprint": 7}'):
        (tmp_path / "law" / METADATA_FILE).write_text(bad)
        with pytest.raises(InvalidInputError, match="not expert-hub adapter metadata"):
            ExpertAdapter.load(tmp_path / "law")


@pytest.mark.parametrize(
    "bad, message",
    [
        (float("nan"), "holds NaN or infinite values"),
        (float("inf"), "holds NaN or infinite values"),
        (torch.int32, "is int32, not a floating-point weight"),
    ],
)
def test_weights_that_are_not_finite_floats_are_refused(tiny_models, tmp_path, bad, message):
    adapter = _trained_adapter(tiny_models["qwen3_moe"], _selection(tiny_models["qwen3_moe"]))
    key = sorted(adapter.tensors)[1]
    with pytest.raises(InvalidInputError, match=message):  # never written
        ExpertAdapter(adapter.selection, {**adapter.tensors, key: _spoiled(adapter.tensors[key], bad)}).save(
            tmp_path / "x"
        )
    assert not (tmp_path / "x").exists()
    adapter.save(tmp_path / "adapter")  # written by something else: refused when read
    tensors = dict(adapter.tensors)
    tensors[key] = _spoiled(tensors[key], bad)
    save_file(tensors, tmp_path / "adapter" / "experts.safetensors")
    with pytest.raises(InvalidInputError, match=f"experts.safetensors: {key} {message}"):
        ExpertAdapter.load(tmp_path / "adapter")
    with pytest.raises(InvalidInputError, match=message):
        load_model(str(tiny_models["qwen3_moe"]), tmp_path / "adapter")


def _spoiled(tensor: torch.Tensor, bad) -> torch.Tensor:
    if isinstance(bad, torch.dtype):
        return tensor.to(bad)
    tensor = tensor.clone()
    tensor.view(-1)[-1] = bad  # one value is enough
    return tensor


def test_an_adapter_is_checked_against_a_model_from_its_headers(tiny_models, tmp_path):
    from expert_hub.adapter import AdapterHeader
    from expert_hub.models import describe_model

    model_dir = tiny_models["qwen3_moe"]
    summary = describe_model(str(model_dir))
    adapter = _trained_adapter(model_dir, _selection(model_dir))
    AdapterHeader.read(adapter.save(tmp_path / "fits")).check_fits(summary)
    gate = next(key for key in adapter.tensors if "gate_proj" in key)
    adapter.tensors[gate] = adapter.tensors[gate][:-1]
    with pytest.raises(
        AdapterMismatchError, match=r"gate_proj.weight has shape \(31, 64\); the model's gate_proj.weight is \(32, 64\)"
    ):
        AdapterHeader.read(adapter.save(tmp_path / "misshapen")).check_fits(summary)
    expert = {
        f"model.layers.1.mlp.experts.8.{p}_proj.weight": torch.zeros(shape)
        for p, shape in (("gate", (32, 64)), ("up", (32, 64)), ("down", (64, 32)))
    }
    with pytest.raises(
        AdapterMismatchError, match="the model has 8 experts per layer; the adapter selects expert 8 of layer 1"
    ):
        AdapterHeader.read(ExpertAdapter(ExpertSelection({1: [8]}), expert).save(tmp_path / "far")).check_fits(summary)
    deepseek = describe_model(str(tiny_models["deepseek_v2"]))  # layer 0 is dense there
    with pytest.raises(AdapterMismatchError, match="layer 0 is not an MoE layer of the model"):
        AdapterHeader.read(tmp_path / "fits").check_fits(deepseek)


def test_tensors_the_selection_does_not_train_are_refused(tiny_models, tmp_path):
    """Without a fingerprint nothing else would stop them: they would be applied to the base like the experts."""
    adapter = _trained_adapter(tiny_models["qwen2_moe"], ExpertSelection({1: [0]}, shared_experts=True))
    adapter.save(tmp_path / "law")
    config = json.loads((tmp_path / "law" / "expert_cfg.json").read_text())
    (tmp_path / "law" / "expert_cfg.json").write_text(json.dumps(config | {"shared_experts": False}))
    with pytest.raises(
        InvalidInputError,
        match=r"holds model.layers.1.mlp.shared_expert.down_proj.weight, which "
        r"expert_cfg.json does not train \(shared_experts is false\)",
    ):
        ExpertAdapter.load(tmp_path / "law")
    experts_only = _trained_adapter(tiny_models["qwen3_moe"], _selection(tiny_models["qwen3_moe"]))
    embed = dict(load_base(str(tiny_models["qwen3_moe"])).named_parameters())["model.embed_tokens.weight"]
    save_file(
        {**experts_only.tensors, "model.embed_tokens.weight": torch.zeros_like(embed)},
        experts_only.save(tmp_path / "intent") / "experts.safetensors",
    )
    with pytest.raises(InvalidInputError, match=r"embed_tokens.weight, which .* \(non_expert_modules is false\)"):
        load_model(str(tiny_models["qwen3_moe"]), tmp_path / "intent")


def test_apply_refuses_integer_tensors_and_says_when_it_rounds(tiny_models, caplog):
    base_dir = tiny_models["qwen3_moe"]
    adapter = _trained_adapter(base_dir, _selection(base_dir))
    key = sorted(adapter.tensors)[0]
    with pytest.raises(InvalidInputError, match=f"{key} is int64, not a floating-point weight"):
        ExpertAdapter(adapter.selection, {**adapter.tensors, key: adapter.tensors[key].long()}).apply(
            load_base(str(base_dir))
        )
    adapter.apply(load_base(str(base_dir)))  # float32 into float32: exact, nothing to say
    assert not caplog.records
    adapter.apply(load_base(str(base_dir), dtype=torch.bfloat16))
    assert "lose precision in the base model's torch.bfloat16" in caplog.text


def test_the_fingerprint_read_from_a_checkpoint_equals_the_loaded_models(tiny_models, family):
    """Per-expert keys, Mixtral's w1/w3/w2 and gpt_oss' fused experts alike: `serve` and `merge` check a task's base
    from the checkpoint's files as `load_model` checks it from the loaded model."""
    base = load_base(str(tiny_models[family]))
    layers = moe_layers(base)
    for selection in (
        ExpertSelection({layers[0].index: [0, 5], layers[-1].index: [7]}),
        ExpertSelection({layers[-1].index: [1]}, shared_experts=True, non_expert_modules=True),
    ):
        assert checkpoint_fingerprint(str(tiny_models[family]), selection) == fingerprint_selection(base, selection)


def test_a_sharded_checkpoints_fingerprint_opens_each_file_once(tmp_path, monkeypatch):
    """A server checks each task's base at its first load: opening a file parses its whole header, so the check
    reads every matrix through one handle per file, not one per matrix."""
    directory = build_tiny_model("qwen3_moe", tmp_path / "base", max_shard_size="100KB")
    base = load_base(str(directory))
    selection = ExpertSelection({layer.index: [0, 3, 5] for layer in moe_layers(base)})
    checkpoint_fingerprint(str(directory), selection)  # the headers are read once per server: not counted
    opened = []
    real_open = checkpoint.safe_open
    monkeypatch.setattr(checkpoint, "safe_open", lambda file, *args: opened.append(file) or real_open(file, *args))
    assert checkpoint_fingerprint(str(directory), selection) == fingerprint_selection(base, selection)
    assert len(opened) == len(set(opened)) > 1  # every file once; the selection spans several shards
