"""Training: only the selected experts move, loss falls, adapters reproduce the trained model, runs resume."""

from __future__ import annotations

import json

import pytest
import torch

from expert_hub import ExpertAdapter, ExpertSelection, load_model
from expert_hub.auto_routing import RoutingProfile
from expert_hub.errors import InvalidInputError
from expert_hub.families import moe_layers, read_expert, split_parameters
from expert_hub.models import load_base
from expert_hub.training import TrainingConfig, train
from expert_hub.training.methods import prepare_esft, trainable_parameters

pytestmark = pytest.mark.slow  # whole training runs: `make test-fast` leaves it out


def _learnable_task(path, count=48):
    """A task a tiny model learns in a few steps: every answer is the same short sentence."""
    with path.open("w") as lines:
        for i in range(count):
            lines.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"question {i}?"},
                            {"role": "assistant", "content": "the answer is law."},
                        ]
                    }
                )
                + "\n"
            )
    return path


def _config(base, data, out, **overrides) -> TrainingConfig:
    values = dict(
        task="law",
        base=str(base),
        data=str(data),
        out=str(out),
        method="esft-token",
        steps=8,
        seq_len=64,
        batch_size=2,
        grad_accumulation=2,
        learning_rate=3e-3,
        weight_decay=0.1,
        score_tokens=1500,
        save_every=4,
        eval_every=4,
        eval_fraction=0.1,
        gradient_checkpointing=False,
    )
    return TrainingConfig(**(values | overrides))


def _experts_by_pair(model) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    return {
        (layer.index, e): read_expert(layer.experts, e) for layer in moe_layers(model) for e in range(layer.num_experts)
    }


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_only_the_selected_experts_change(tiny_models, tmp_path, esft_data, family):
    result = train(_config(tiny_models[family], esft_data / "datasets/train/law.jsonl", tmp_path / "run"))
    adapter = ExpertAdapter.load(result.artifact)
    selected = set(adapter.selection.pairs)
    assert selected and adapter.metadata.method == "esft-token" and adapter.metadata.top_p == 0.2
    base = load_base(str(tiny_models[family]))
    trained = load_model(str(tiny_models[family]), result.artifact)
    base_experts, trained_experts = _experts_by_pair(base), _experts_by_pair(trained)
    for pair, tensors in trained_experts.items():
        same = all(torch.equal(tensors[name], base_experts[pair][name]) for name in tensors)
        assert same != (pair in selected), pair  # unselected: bit-identical; selected: changed
    routed = set(split_parameters(trained)["routed"])
    base_tensors = dict(base.named_parameters()) | dict(base.named_buffers())
    for name, tensor in [*trained.named_parameters(), *trained.named_buffers()]:
        if name not in routed:  # routers, attention, norms, embeddings, shared experts
            assert torch.equal(tensor, base_tensors[name]), name


def test_optimizer_state_covers_only_the_selected_rows(tiny_models):
    model = load_base(str(tiny_models["qwen2_moe"]))
    selection = ExpertSelection({1: [0, 5], 3: [2]})
    prepare_esft(model, selection)
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    model(torch.randint(0, 256, (2, 16)), labels=torch.randint(0, 256, (2, 16))).loss.backward()
    optimizer.step()
    state_rows = sorted(state["exp_avg"].shape[0] for state in optimizer.state.values())
    assert state_rows == [1, 1, 2, 2]  # gate_up and down rows of layer 3 (1 expert) and layer 1 (2 experts)
    assert sum(p.numel() for p in trainable.values()) == 3 * (64 * 64 + 64 * 32)


def test_loss_falls_and_the_adapter_reproduces_the_trained_logits(tiny_models, tmp_path):
    data = _learnable_task(tmp_path / "task.jsonl")
    reports = []
    result = train(
        _config(tiny_models["qwen3_moe"], data, tmp_path / "run", steps=12, top_p=0.5), on_step=reports.append
    )
    assert reports[-1].loss < 0.6 * reports[0].loss
    assert result.eval_loss is not None and result.eval_loss < 0.6 * reports[0].loss
    input_ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        trained = result.model.eval()(input_ids).logits
        reloaded = load_model(str(tiny_models["qwen3_moe"]), result.artifact)(input_ids).logits
        base = load_base(str(tiny_models["qwen3_moe"]))(input_ids).logits
    assert torch.equal(trained, reloaded) and not torch.equal(trained, base)
    profile = RoutingProfile.load(result.artifact)  # how the base routes the task's prompts, for auto routing
    assert set(profile.shares) == {layer.index for layer in moe_layers(result.model)} and profile.tokens > 0


def _train_until_interrupted_at_step_6(config: TrainingConfig) -> None:
    """Ctrl-C as step 6 ends: whatever checkpoints that step wrote stay, the run stops there."""

    def interrupt(report):
        if report.step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=interrupt)


def test_an_interrupted_run_resumes_and_ends_where_an_uninterrupted_one_does(tiny_models, tmp_path, esft_data):
    data = esft_data / "datasets/train/law.jsonl"
    whole = train(_config(tiny_models["mixtral"], data, tmp_path / "whole", steps=10))

    _train_until_interrupted_at_step_6(_config(tiny_models["mixtral"], data, tmp_path / "split", steps=10))
    assert not (tmp_path / "split" / "adapter").exists()
    resumed = train(_config(tiny_models["mixtral"], data, tmp_path / "split", steps=10))
    assert resumed.resumed_from == 4  # the step-6 checkpoint was never written: lost 2 steps at most
    first, second = ExpertAdapter.load(whole.artifact), ExpertAdapter.load(resumed.artifact)
    assert first.selection == second.selection and first.tensors.keys() == second.tensors.keys()
    assert all(torch.equal(first.tensors[key], second.tensors[key]) for key in first.tensors)
    log = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 11))


def test_a_different_run_in_the_same_output_is_refused(tiny_models, tmp_path, esft_data):
    data = esft_data / "datasets/train/law.jsonl"
    train(_config(tiny_models["olmoe"], data, tmp_path / "run", steps=2))
    with pytest.raises(InvalidInputError, match="learning_rate: 0.003 -> 0.01"):
        train(_config(tiny_models["olmoe"], data, tmp_path / "run", steps=4, learning_rate=1e-2))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="holds no expert-hub run"):
        train(_config(tiny_models["olmoe"], data, tmp_path / "other"))


def test_given_experts_with_shared_experts_train_those_too(tiny_models, tmp_path, esft_data):
    experts = tmp_path / "cfg.json"
    ExpertSelection({1: [3], 2: [0, 1]}, shared_experts=True).save(experts)
    result = train(
        _config(
            tiny_models["deepseek_v2"],
            esft_data / "datasets/train/law.jsonl",
            tmp_path / "run",
            method="esft",
            experts=str(experts),
            steps=3,
            gradient_checkpointing=True,
        )
    )
    adapter = ExpertAdapter.load(result.artifact)
    shared = [key for key in adapter.tensors if ".shared_experts." in key]
    assert len(shared) == 3 * 3  # three MoE layers, gate/up/down each
    base = dict(load_base(str(tiny_models["deepseek_v2"])).named_parameters())
    assert not torch.equal(adapter.tensors[shared[0]], base[shared[0]])
    assert adapter.metadata.training["steps"] == 3 and adapter.metadata.top_p is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_esft_kernel_computes_what_the_standard_kernel_does(tiny_models, family, dtype):
    """Before any step, the model with ESFT's two-group experts forward gives the base model's logits."""
    model = load_base(str(tiny_models[family]), dtype=dtype).eval()
    input_ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        standard = model(input_ids).logits
        prepare_esft(model, ExpertSelection({layer.index: [1, 4, 6] for layer in moe_layers(model)}))
        esft = model(input_ids).logits
    if dtype == torch.bfloat16:
        assert torch.equal(esft, standard)
    else:  # float32 matmuls over different row groupings differ in the last bits
        torch.testing.assert_close(esft, standard, rtol=1e-5, atol=1e-5)


def test_rows_train_in_float32_when_the_model_is_bfloat16(tiny_models, tmp_path, esft_data):
    result = train(
        _config(
            tiny_models["qwen3_moe"],
            esft_data / "datasets/train/law.jsonl",
            tmp_path / "run",
            dtype="bfloat16",
            steps=6,
            save_every=6,
            learning_rate=1e-4,
        )
    )
    adapter = ExpertAdapter.load(result.artifact)
    assert {tensor.dtype for tensor in adapter.tensors.values()} == {torch.bfloat16}
    base = load_base(str(tiny_models["qwen3_moe"]), dtype=torch.bfloat16)
    layer = moe_layers(base)[0]
    expert = adapter.selection.experts[layer.index][0]
    before = read_expert(layer.experts, expert)["gate_proj.weight"]
    after = adapter.tensors[layer.expert_key(expert, "gate_proj.weight")]
    assert (before != after).float().mean() > 0.6  # steps below bf16 resolution add up in float32 rows


def test_gradient_accumulation_matches_one_larger_batch(tiny_models, tmp_path, esft_data):
    experts = tmp_path / "cfg.json"
    ExpertSelection({1: [0, 3], 3: [5]}).save(experts)
    runs = {}
    for name, batch, accumulation in (("accumulated", 1, 2), ("batched", 2, 1)):
        runs[name] = train(
            _config(
                tiny_models["deepseek_v3"],
                esft_data / "datasets/train/law.jsonl",
                tmp_path / name,
                method="esft",
                experts=str(experts),
                steps=1,
                batch_size=batch,
                grad_accumulation=accumulation,
            )
        )
    assert runs["accumulated"].train_loss == pytest.approx(runs["batched"].train_loss, rel=1e-5)
    first, second = (ExpertAdapter.load(run.artifact).tensors for run in runs.values())
    for key in first:  # Adam's first step is sign-like: a gradient within rounding of 0 may flip, nothing more
        assert (first[key] - second[key]).abs().gt(1e-6).float().mean() < 0.01, key


def test_biases_and_norms_are_not_decayed(tiny_models):
    from expert_hub.training.loop import param_groups
    from expert_hub.training.methods import prepare_full

    model = prepare_full(load_base(str(tiny_models["gpt_oss"])))
    trainable = trainable_parameters(model)
    decayed, exempt = (group["params"] for group in param_groups(trainable, 0.1))
    names = {id(p): name for name, p in trainable.items()}
    assert all("norm" in names[id(p)] or "bias" in names[id(p)] or p.ndim < 2 for p in exempt)
    assert {"model.norm.weight", "model.layers.0.mlp.router.bias"} <= {names[id(p)] for p in exempt}
    assert "model.layers.0.self_attn.q_proj.weight" in {names[id(p)] for p in decayed}


def test_resuming_needs_the_same_run(tiny_models, tmp_path, esft_data):
    data = esft_data / "datasets/train/law.jsonl"
    train(_config(tiny_models["olmoe"], data, tmp_path / "run", steps=4))
    with pytest.raises(InvalidInputError, match="already holds step 4; ask for --steps 4 or more"):
        train(_config(tiny_models["olmoe"], data, tmp_path / "run", steps=2))
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(saved | {"processes": 2}))
    with pytest.raises(InvalidInputError, match="processes: 2 -> 1"):
        train(_config(tiny_models["olmoe"], data, tmp_path / "run", steps=6))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dtype": "float16"}, "float16 overflows"),
        ({"clip_grad_norm": 0.0}, "--clip-grad-norm must be above 0"),
        ({"method": "esft", "experts": "EMPTY"}, "nothing to train"),
        ({"data": "NO_ANSWERS"}, "has no assistant answers"),
    ],
)
def test_training_refuses_what_cannot_work(tiny_models, tmp_path, overrides, message, esft_data):
    empty = tmp_path / "empty.json"
    ExpertSelection({}).save(empty)
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(9))
    )
    overrides = {
        key: {"EMPTY": str(empty), "NO_ANSWERS": str(questions)}.get(value, value) for key, value in overrides.items()
    }
    data = overrides.pop("data", esft_data / "datasets/train/law.jsonl")
    with pytest.raises(InvalidInputError, match=message):
        train(_config(tiny_models["qwen3_moe"], data, tmp_path / "run", **overrides))


@pytest.mark.parametrize("lora_experts", [True, False])
def test_lora_never_touches_routers_and_no_lora_experts_means_none(tiny_models, family, lora_experts):
    from expert_hub.training.methods import prepare_lora

    model = load_base(str(tiny_models[family]))
    layers = moe_layers(model)
    routers = tuple(f"{layer.prefix}.{layer.family.router}." for layer in layers)
    routed = tuple(f"{layer.prefix}.experts." for layer in layers)
    lora = [
        name
        for name, p in prepare_lora(model, 4, 8, ["all-linear"], lora_experts).named_parameters()
        if p.requires_grad
    ]
    assert lora and all("lora_" in name for name in lora)
    assert not [name for name in lora if any(router in name for router in routers)]
    on_experts = [name for name in lora if any(prefix in name for prefix in routed)]
    assert bool(on_experts) == lora_experts
    assert any("self_attn" in name for name in lora)


@pytest.mark.parametrize("damage", ["cut", "truncate"])
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(tiny_models, tmp_path, esft_data, damage):
    """A tensor cut to [..., :1] would be broadcast by copy_ into every column; a truncated file, a traceback."""
    from safetensors.torch import load_file, save_file

    data = esft_data / "datasets/train/law.jsonl"
    whole = train(_config(tiny_models["mixtral"], data, tmp_path / "whole", steps=10))

    _train_until_interrupted_at_step_6(
        _config(tiny_models["mixtral"], data, tmp_path / "split", steps=10, save_every=2)
    )
    checkpoints = sorted((tmp_path / "split" / "checkpoints").glob("step-*"))
    weights = checkpoints[-1] / "trainable.safetensors"
    if damage == "cut":
        save_file({name: tensor[..., :1].contiguous() for name, tensor in load_file(weights).items()}, weights)
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    messages = []
    resumed = train(
        _config(tiny_models["mixtral"], data, tmp_path / "split", steps=10, save_every=2), on_status=messages.append
    )
    assert resumed.resumed_from == int(checkpoints[-2].name.split("-")[1])
    assert any(m.startswith(f"warning: {checkpoints[-1].name}") for m in messages), messages
    first, second = ExpertAdapter.load(whole.artifact), ExpertAdapter.load(resumed.artifact)
    assert all(torch.equal(first.tensors[key], second.tensors[key]) for key in first.tensors)


def test_no_intact_checkpoint_is_one_clear_error(tiny_models, tmp_path, esft_data):
    data = esft_data / "datasets/train/law.jsonl"
    train(_config(tiny_models["mixtral"], data, tmp_path / "run", steps=4))
    (tmp_path / "run" / "adapter").rename(tmp_path / "adapter-kept")
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("step-*"):
        (checkpoint / "optimizer.json").write_text("{}")
    with pytest.raises(InvalidInputError, match=r"no checkpoint in .* can be resumed .*use a new --out"):
        train(_config(tiny_models["mixtral"], data, tmp_path / "run", steps=6))


def test_a_new_method_is_one_registered_class(tiny_models, tmp_path, esft_data):
    """What `register_method` promises: a method registered from outside the package trains through `train`,
    and writes the artifact it defines, without any other file knowing its name."""
    from expert_hub.training.methods import base as methods_base
    from expert_hub.training.methods.base import TrainingMethod, register_method, write_model_directory

    @register_method
    class RoutersOnly(TrainingMethod):
        name = "routers-only"
        default_learning_rate = 2e-3
        artifact_name = "routers"

        def prepare(self, model, run):
            model.requires_grad_(False)
            for layer in moe_layers(model):
                layer.router.requires_grad_(True)
            return model

        def write_artifact(self, model, path, tokenizer, metadata):
            return write_model_directory(model, path, metadata)

    try:
        config = _config(
            tiny_models["qwen3_moe"],
            esft_data / "datasets/train/law.jsonl",
            tmp_path / "run",
            method="routers-only",
            learning_rate=None,
            steps=2,
        )
        assert config.lr == 2e-3
        result = train(config)
        assert result.artifact == tmp_path / "run" / "routers"
        assert json.loads((result.artifact / "expert_hub.json").read_text())["method"] == "routers-only"
        base, trained = load_base(str(tiny_models["qwen3_moe"])), dict(result.model.named_parameters())
        changed = {name for name, tensor in base.named_parameters() if not torch.equal(tensor, trained[name])}
        assert changed and all(".mlp.gate." in name for name in changed)
    finally:
        del methods_base._METHODS["routers-only"]
    with pytest.raises(InvalidInputError, match="unknown method 'routers-only'"):
        _config(tiny_models["qwen3_moe"], esft_data / "datasets/train/law.jsonl", tmp_path / "x", method="routers-only")


def test_the_step_with_the_lowest_eval_loss_is_shipped(tiny_models, tmp_path, esft_data, monkeypatch):
    """As the reference's load_best_model_at_end: evaluated at steps 2, 4, 6, 8, the best (4) is shipped; its
    weights are those of a run that stopped at step 4 (the data order depends on the step, not on --steps)."""
    from expert_hub.training import loop

    def eval_losses(values):
        losses = iter(values)
        monkeypatch.setattr(loop, "_eval_loss", lambda *args: next(losses))

    data = esft_data / "datasets/train/law.jsonl"
    eval_losses([1.0, 0.5, 0.8, 0.9])
    best = train(_config(tiny_models["qwen3_moe"], data, tmp_path / "best", eval_every=2, save_every=2))
    assert (best.shipped_step, best.eval_loss, best.train_loss is not None) == (4, 0.5, True)
    metadata = ExpertAdapter.load(best.artifact).metadata
    assert metadata.training["shipped_step"] == 4 and metadata.metrics["eval_loss"] == 0.5
    eval_losses([1.0, 0.5])
    stopped = train(_config(tiny_models["qwen3_moe"], data, tmp_path / "stopped", eval_every=2, steps=4, keep="last"))
    shipped, reference = ExpertAdapter.load(best.artifact), ExpertAdapter.load(stopped.artifact)
    assert shipped.tensors.keys() == reference.tensors.keys()
    assert all(torch.equal(shipped.tensors[key], reference.tensors[key]) for key in shipped.tensors)
    eval_losses([1.0, 0.5, 0.8, 0.9])
    last = train(_config(tiny_models["qwen3_moe"], data, tmp_path / "last", eval_every=2, keep="last"))
    assert (last.shipped_step, last.eval_loss) == (8, 0.9)
    assert not all(torch.equal(t, ExpertAdapter.load(last.artifact).tensors[k]) for k, t in shipped.tensors.items())


def test_a_resumed_run_remembers_its_best_step(tiny_models, tmp_path, esft_data, monkeypatch):
    """The best step (2) lies before the checkpoint a resume starts from (4): the resumed run still ships it."""
    from expert_hub.training import loop

    losses = iter([0.5, 0.8, 0.9, 0.7, 0.6, 0.9])  # steps 2, 4, 6 | resumed: 6, 8, 10
    monkeypatch.setattr(loop, "_eval_loss", lambda *args: next(losses))
    data = esft_data / "datasets/train/law.jsonl"
    config = dict(steps=10, eval_every=2, save_every=4)
    _train_until_interrupted_at_step_6(_config(tiny_models["qwen3_moe"], data, tmp_path / "split", **config))
    resumed = train(_config(tiny_models["qwen3_moe"], data, tmp_path / "split", **config))
    assert (resumed.resumed_from, resumed.shipped_step, resumed.eval_loss) == (4, 2, 0.5)
    losses = iter([0.5])
    stopped = train(_config(tiny_models["qwen3_moe"], data, tmp_path / "stopped", steps=2, eval_every=2, keep="last"))
    shipped, reference = ExpertAdapter.load(resumed.artifact), ExpertAdapter.load(stopped.artifact)
    assert all(torch.equal(shipped.tensors[key], reference.tensors[key]) for key in shipped.tensors)


def test_general_data_is_mixed_in_by_seed_and_never_scored(tiny_models, tmp_path, esft_data):
    """--mix-data: mix_ratio general conversations per task one (cycled when fewer), shuffled in with the seed; the
    experts are still selected on the task data alone, and the run records what it mixed in."""
    from expert_hub.data import load_conversations, tokenize_conversation
    from expert_hub.models import load_tokenizer
    from expert_hub.training.batches import mixed as _mixed

    base, task = tiny_models["qwen3_moe"], esft_data / "datasets/train/law.jsonl"
    general = tmp_path / "general.jsonl"
    general.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"tell a story {i}"},
                        {"role": "assistant", "content": f"once upon a time, story {i}."},
                    ]
                }
            )
            + "\n"
            for i in range(7)
        )
    )
    tokenizer = load_tokenizer(str(base))
    stories = [tokenize_conversation(m, tokenizer) for m in load_conversations(general)]
    task_examples = [tokenize_conversation(m, tokenizer) for m in load_conversations(task)][:20]
    config = _config(base, task, tmp_path / "unused", mix_data=str(general), mix_ratio=1.0)
    mixed = _mixed(task_examples, config, tokenizer)
    assert len(mixed) == 40 and sum(example in stories for example in mixed) == 20  # 7 stories, cycled to 20
    assert all(example in mixed for example in task_examples) and all(example in mixed for example in stories)
    assert mixed == _mixed(task_examples, config, tokenizer)  # a pure function of the seed
    assert any(example in stories for example in mixed[:20]), "general examples are shuffled in, not appended"
    config.mix_ratio = 0.5
    assert sum(example in stories for example in _mixed(task_examples, config, tokenizer)) == 10

    plain = train(_config(base, task, tmp_path / "plain", steps=2))
    with_general = train(_config(base, task, tmp_path / "mixed", steps=2, mix_data=str(general)))
    assert (tmp_path / "mixed" / "expert_cfg.json").read_text() == (tmp_path / "plain" / "expert_cfg.json").read_text()
    assert json.loads((tmp_path / "mixed" / "scores.json").read_text())["source"]["data"] == str(task)
    recorded = ExpertAdapter.load(with_general.artifact).metadata.training["config"]
    assert (recorded["mix_data"], recorded["mix_ratio"]) == (str(general), 1.0)
    assert ExpertAdapter.load(plain.artifact).metadata.training["config"]["mix_data"] is None
    for ratio in (float("nan"), -1.0, 1e9):  # 1e9 would hold about 10^12 examples in memory
        with pytest.raises(InvalidInputError, match=rf"--mix-ratio must be in \[0, 100\], got {ratio}"):
            _config(base, task, tmp_path / "x", mix_data=str(general), mix_ratio=ratio)


def test_a_run_started_before_a_setting_existed_still_resumes(tmp_path):
    """A train_config.json without a newer field holds that field at its default; another value is refused."""
    config = _config("base", "data.jsonl", tmp_path / "run")
    older = {key: value for key, value in config.to_json().items() if key not in ("mix_data", "mix_ratio", "keep")}
    config.check_resumable_from(older, str(tmp_path / "run"))
    with pytest.raises(InvalidInputError, match=r"mix_ratio: 1.0 -> 0.5"):
        _config("base", "data.jsonl", tmp_path / "run", mix_ratio=0.5).check_resumable_from(older, "run")


def test_a_run_of_an_earlier_run_format_is_not_resumed(tmp_path):
    """A run started before the held-out split and eval loss became the reference's (its train_config.json has no
    run_format) would go on with other blocks: refused, not mixed."""
    config = _config("base", "data.jsonl", tmp_path / "run")
    config.check_resumable_from(config.to_json(), "run")
    older = {key: value for key, value in config.to_json().items() if key != "run_format"}
    with pytest.raises(InvalidInputError, match=r"run format 1, this one 2\); use a new --out"):
        config.check_resumable_from(older, "run")


def test_a_small_data_set_still_holds_out_a_block_and_no_eval_loss_is_said(tiny_models, tmp_path):
    """Under 50 packed blocks, int(0.02 n) held out none and --keep best shipped the last step silently; the
    reference's split holds out n - int(0.98 n), at least one. With none held out (--eval-fraction 0), one line
    says that --keep best cannot choose."""
    data = _learnable_task(tmp_path / "task.jsonl", count=24)
    messages = []
    result = train(
        _config(tiny_models["qwen3_moe"], data, tmp_path / "run", eval_fraction=0.02), on_status=messages.append
    )
    metadata = ExpertAdapter.load(result.artifact).metadata.training
    assert metadata["train_blocks"] < 50 and metadata["eval_blocks"] == 1
    assert result.eval_loss is not None and not any("warning" in message for message in messages)
    messages.clear()
    unmeasured = train(
        _config(tiny_models["qwen3_moe"], data, tmp_path / "none", eval_fraction=0), on_status=messages.append
    )
    assert unmeasured.eval_loss is None
    assert [m for m in messages if m.startswith("warning")] == [
        "warning: no eval loss (--eval-fraction 0 holds out none of the "
        f"{ExpertAdapter.load(unmeasured.artifact).metadata.training['train_blocks']} blocks): "
        "--keep best ships the last step"
    ]


def test_micro_batches_are_made_one_at_a_time(tmp_path):
    """--grad-accumulation sizes no memory: a step's micro-batches are made as they are trained on, not all first."""
    from itertools import islice

    from accelerate import Accelerator

    from expert_hub.training.batches import DataOrder, micro_batches

    config = _config("base", "data.jsonl", tmp_path / "run", grad_accumulation=10**12, batch_size=3)
    first = list(islice(micro_batches(0, config, Accelerator(cpu=True), DataOrder(10, seed=0)), 2))
    assert [len(indices) for indices in first] == [3, 3]
