"""`expert-hub merge`: tasks' experts written into a full checkpoint that plain transformers (and vLLM) load.

The serving oracle (`serving_oracle.make_tasks`) merges its tasks with `merge_tasks` too, so the serving tests check
that plain vLLM on a merged directory gives the tokens `expert-hub serve` gives for the task.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from expert_hub import ExpertAdapter, ExpertSelection, load_model
from expert_hub.errors import InvalidInputError
from expert_hub.families import moe_layers
from expert_hub.merge import merge_tasks, plan_merge
from expert_hub.models import load_base
from expert_hub.testing import build_tiny_model

PROMPT = torch.tensor([[256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66]])


def _adapter(base_dir: Path, experts: dict, directory: Path, seed: int, **selection_flags) -> Path:
    """A saved adapter whose tensors differ from the base's, as training would leave them."""
    adapter = ExpertAdapter.from_model(
        load_base(str(base_dir)), ExpertSelection(experts, **selection_flags), task=directory.name
    )
    generator = torch.Generator().manual_seed(seed)
    adapter.tensors = {key: torch.randn(t.shape, generator=generator) * 0.5 for key, t in adapter.tensors.items()}
    return adapter.save(directory)


def _every_layer(base_dir: Path, experts: list[int]) -> dict[int, list[int]]:
    return {layer.index: experts for layer in moe_layers(load_base(str(base_dir)))}


def _state(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters()) | dict(model.named_buffers())


def _assert_same_model(merged_dir: Path, expected) -> None:
    """Every weight and the logits of the merged directory, loaded by plain transformers, equal `expected`'s."""
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    got, want = _state(merged), _state(expected)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert tensor.dtype == got[name].dtype and torch.equal(got[name], tensor), name
    with torch.no_grad():
        assert torch.equal(merged(PROMPT).logits, expected(PROMPT).logits)


def _layout(directory: Path) -> dict[str, tuple]:
    """Every checkpoint tensor's name, shape and dtype."""
    layout = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                layout[key] = (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
    return layout


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_a_merged_task_loads_in_transformers_as_load_model_gives_it(tiny_models, family, tmp_path):
    base = tiny_models[family]
    adapter = _adapter(base, _every_layer(base, [0, 5]), tmp_path / "law", seed=1)
    merge_tasks(str(base), [str(adapter)], tmp_path / "merged")
    _assert_same_model(tmp_path / "merged", load_model(str(base), adapter))
    assert _layout(tmp_path / "merged") == _layout(base)  # the base's own names and layout, fused or per expert
    with torch.no_grad():
        assert not torch.equal(load_base(str(base))(PROMPT).logits, load_model(str(base), adapter)(PROMPT).logits)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (base / name).read_bytes()


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])  # a float32-only buffer; float32-at-fp16 norms
def test_a_dtype_merge_equals_load_model_in_that_dtype(tiny_models, family, tmp_path):
    base = tiny_models[family]
    adapter = _adapter(base, _every_layer(base, [1, 6]), tmp_path / "law", seed=2)
    merge_tasks(str(base), [str(adapter)], tmp_path / "merged", dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    expected = load_model(str(base), adapter, dtype=torch.bfloat16)
    for name, tensor in _state(expected).items():
        assert tensor.dtype == _state(merged)[name].dtype and torch.equal(_state(merged)[name], tensor), name
    with torch.no_grad():
        assert torch.equal(merged(PROMPT).logits, expected(PROMPT).logits)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    layout = _layout(tmp_path / "merged")
    assert {dtype for _, dtype in layout.values()} <= {"BF16", "F32"}
    assert sum(dtype == "BF16" for _, dtype in layout.values()) > 0.9 * len(layout)


@pytest.mark.parametrize(("stored", "dtype"), [("float16", "auto"), ("bfloat16", "float16")])
def test_tensors_transformers_holds_in_float32_get_the_task_unrounded(tiny_models, tmp_path, stored, dtype):
    """gpt_oss holds its norms in float32 at float16: a task that trained them (non-expert modules) must reach them
    as `load_model` puts them there, not rounded to the 16 bits the base stores everything in."""
    base = tmp_path / f"base-{stored}"
    base.mkdir()
    for path in tiny_models["gpt_oss"].iterdir():
        (base / path.name).write_bytes(path.read_bytes())
    tensors = load_file(base / "model.safetensors")
    save_file({key: tensor.to(getattr(torch, stored)) for key, tensor in tensors.items()}, base / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"dtype": stored}))
    adapter = _adapter(base, {1: [2]}, tmp_path / "law", seed=16, non_expert_modules=True)
    merge_tasks(str(base), [str(adapter)], tmp_path / "merged", dtype=dtype)
    loaded_as = torch.float16
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=loaded_as)
    expected = load_model(str(base), adapter, force=True, dtype=loaded_as)
    norms = [name for name in _state(expected) if "norm" in name]
    assert norms and all(_state(expected)[name].dtype == torch.float32 for name in norms)
    for name, tensor in _state(expected).items():
        assert tensor.dtype == _state(merged)[name].dtype and torch.equal(_state(merged)[name], tensor), name


def test_a_sharded_base_cast_to_another_dtype_keeps_its_index_true(tmp_path):
    base = build_tiny_model("qwen3_moe", tmp_path / "base", max_shard_size="100KB")
    adapter = _adapter(base, {1: [0], 3: [6]}, tmp_path / "law", seed=15)
    merge_tasks(str(base), [str(adapter)], tmp_path / "merged", dtype="float16")
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    sizes = {
        key: math.prod(shape) * (2 if dtype == "F16" else 4)
        for key, (shape, dtype) in _layout(tmp_path / "merged").items()
    }
    assert index["metadata"]["total_size"] == sum(sizes.values())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float16)
    # force: the fingerprint rounds float16-loaded weights differently from float32 ones, so load_model would refuse
    with torch.no_grad():
        assert torch.equal(
            merged(PROMPT).logits, load_model(str(base), adapter, force=True, dtype=torch.float16)(PROMPT).logits
        )


def test_disjoint_tasks_merge_into_one_model_equal_to_applying_both(tiny_models, tmp_path):
    base = tiny_models["qwen3_moe"]
    law = _adapter(base, {1: [0, 2], 3: [4]}, tmp_path / "law", seed=3)
    math = _adapter(base, {1: [1], 2: [5, 6]}, tmp_path / "math", seed=4)
    result = merge_tasks(str(base), [str(law), str(math)], tmp_path / "merged")
    both = ExpertAdapter.load(math).apply(load_model(str(base), law))
    _assert_same_model(tmp_path / "merged", both)
    assert [task.name for task in result.tasks] == ["law", "math"] and not result.overridden
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "| law |" in card and "| math |" in card and result.tasks[0].digest[:16] in card


def test_overlapping_tasks_are_refused_unless_the_first_may_win(tiny_models, tmp_path, run_cli):
    base = tiny_models["qwen3_moe"]
    law = _adapter(base, {1: [0, 2], 3: [4]}, tmp_path / "law", seed=3)
    math = _adapter(base, {1: [2], 3: [4, 5]}, tmp_path / "math", seed=4)
    code, out, err = run_cli("merge", f"{law},{math}", "--base", base, "--out", tmp_path / "merged")
    assert code == 1 and err.count("\n") == 1
    assert "share 2 experts: layer 1 expert 2 (law and math), layer 3 expert 4 (law and math)" in err
    assert not (tmp_path / "merged").exists()

    code, out, err = run_cli(
        "merge", f"{law},{math}", "--base", base, "--out", tmp_path / "merged", "--on-overlap", "first"
    )
    assert code == 0, err
    assert "math: 2 of its experts were taken by an earlier task" in out
    law_wins = ExpertAdapter.load(law).apply(ExpertAdapter.load(math).apply(load_base(str(base))), force=True)
    _assert_same_model(tmp_path / "merged", law_wins)
    assert "- math: 2 experts taken by an earlier task" in (tmp_path / "merged" / "README.md").read_text()


def test_a_task_with_shared_experts_merges_alone(tiny_models, tmp_path):
    base = tiny_models["qwen2_moe"]
    shared = _adapter(base, {1: [0]}, tmp_path / "shared", seed=5, shared_experts=True)
    other = _adapter(base, {2: [3]}, tmp_path / "other", seed=6)
    with pytest.raises(InvalidInputError, match="also trained shared experts or non-expert modules.*merge it alone"):
        merge_tasks(str(base), [str(other), str(shared)], tmp_path / "merged")
    merge_tasks(str(base), [str(shared)], tmp_path / "merged")
    _assert_same_model(tmp_path / "merged", load_model(str(base), shared))


def test_another_base_is_refused_unless_forced(tiny_models, tmp_path, run_cli):
    trained_on = build_tiny_model("qwen3_moe", tmp_path / "other-base", seed=7)
    adapter = _adapter(trained_on, {1: [0]}, tmp_path / "law", seed=1)
    base = tiny_models["qwen3_moe"]
    code, _, err = run_cli("merge", adapter, "--base", base, "--out", tmp_path / "merged")
    assert code == 1 and "task law was trained from other base weights" in err and "--force" in err
    code, _, err = run_cli("merge", adapter, "--base", base, "--out", tmp_path / "merged", "--force")
    assert code == 0, err
    _assert_same_model(tmp_path / "merged", load_model(str(base), adapter, force=True))


def test_a_registered_task_merges_by_name_and_the_card_names_it(tiny_models, tmp_path, run_cli):
    base = tiny_models["olmoe"]
    adapter = _adapter(base, {1: [3]}, tmp_path / "law", seed=8)
    assert run_cli("import", adapter, "--base", base)[0] == 0
    code, out, err = run_cli("merge", "law@1", "--base", base, "--out", tmp_path / "merged")
    assert code == 0, err
    assert "Merged law@1 into" in out
    from expert_hub.registry import Registry

    entry = Registry().resolve("law@1", str(base))
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"| law@1 | `{entry.digest[:16]}` | 1 | 1 |" in card


def test_without_base_the_demo_base_is_merged_into(tmp_path, run_cli):
    from expert_hub.demo import demo_base

    adapter = _adapter(Path(demo_base()), {1: [0, 3]}, tmp_path / "law", seed=14)
    code, out, err = run_cli("merge", adapter, "--out", tmp_path / "merged")
    assert code == 0 and "Merged law into" in out, err
    _assert_same_model(tmp_path / "merged", load_model(demo_base(), adapter))


def test_a_hub_base_is_downloaded_and_named_in_the_card(tiny_models, tmp_path, hub, run_cli):
    base = tiny_models["qwen3_moe"]
    HfApi().create_repo("acme/tiny-moe")
    HfApi().upload_folder(repo_id="acme/tiny-moe", folder_path=base)
    adapter = _adapter(base, {1: [0], 2: [3]}, tmp_path / "law", seed=12)
    code, _, err = run_cli("merge", adapter, "--base", "acme/tiny-moe", "--out", tmp_path / "merged")
    assert code == 0, err
    _assert_same_model(tmp_path / "merged", load_model(str(base), adapter))
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert (card.data.base_model, card.data.base_model_relation) == ("acme/tiny-moe", "merge")
    assert "- Base: acme/tiny-moe" in card.text
    code, _, err = run_cli("merge", adapter, "--base", "acme/no-such-model", "--out", tmp_path / "other")
    assert code == 1 and "repository acme/no-such-model not found" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchtask"], "no registered task 'nosuchtask'"),
        (["{lora}"], "is a LoRA adapter: merge it with PEFT's merge_and_unload()"),
        (["{law}", "--out", "{existing}"], "already exists and is not empty"),
        (["{law}", "--dtype", "int8"], "Invalid value for '--dtype'"),
        (["{law}", "--base", "{not_a_model}"], "is not a model directory"),
        (["{law}", "--out", "{law}", "--overwrite"], "which the merge reads: write it somewhere else"),
    ],
)
def test_bad_input_is_one_line(tiny_models, tmp_path, run_cli, args, message):
    base = tiny_models["qwen3_moe"]
    paths = {
        "law": _adapter(base, {1: [0]}, tmp_path / "law", seed=1),
        "lora": tmp_path / "lora",
        "existing": tmp_path / "existing",
        "not_a_model": tmp_path / "lora",
    }
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    args = [arg.format(**paths) for arg in args]
    out = ["--out", tmp_path / "merged"] if "--out" not in args else []
    code, _, err = run_cli("merge", *args, *(["--base", base] if "--base" not in args else []), *out)
    assert code != 0 and message in err and err.count("\n") == 1, err
    assert (tmp_path / "existing" / "keep.txt").read_text() == "mine" and not (tmp_path / "merged").exists()
    assert (paths["law"] / "experts.safetensors").is_file()


# --- a base in several shards: streaming, resuming, memory -----------------------------------------------------------

# 4 MoE layers of 64 experts at 512 x 512: about 200 MB of experts per layer, a shard per layer or so.
LARGE = dict(hidden_size=512, num_experts=64, moe_intermediate_size=512, intermediate_size=512, head_dim=64)


@pytest.fixture(scope="module")
def large_base(tmp_path_factory) -> Path:
    return build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("large") / "base", max_shard_size="256MB", **LARGE)


def _largest_shard(directory: Path) -> int:
    return max(path.stat().st_size for path in directory.glob("*.safetensors"))


def _merge_command(base: Path, adapter: Path, out: Path) -> list[str]:
    return [
        str(Path(sys.executable).with_name("expert-hub")),
        "merge",
        str(adapter),
        "--base",
        str(base),
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_a_sharded_base_is_streamed_untouched_shards_copied(large_base, tmp_path):
    adapter = _adapter(large_base, {0: [1, 2]}, tmp_path / "law", seed=9)
    shards = sorted(large_base.glob("*.safetensors"))
    before = {shard.name: hashlib.sha256(shard.read_bytes()).hexdigest() for shard in shards}
    result = merge_tasks(str(large_base), [str(adapter)], tmp_path / "merged")
    assert {shard.name: hashlib.sha256(shard.read_bytes()).hexdigest() for shard in shards} == before  # base intact
    assert len(shards) >= 3 and result.shards_rewritten == 1 and result.shards_copied == len(shards) - 1
    index = "model.safetensors.index.json"
    assert json.loads((tmp_path / "merged" / index).read_text()) == json.loads((large_base / index).read_text())
    touched = {
        json.loads((large_base / index).read_text())["weight_map"]["model.layers.0.mlp.experts.1.up_proj.weight"]
    }
    for shard in shards:
        same = (tmp_path / "merged" / shard.name).read_bytes() == shard.read_bytes()
        assert same == (shard.name not in touched), shard.name


@pytest.mark.slow
def test_a_killed_merge_reruns_to_the_same_bytes_keeping_finished_shards(large_base, tmp_path):
    """kill -9 after the first shard is in place; the rerun keeps that shard and writes the rest."""
    layers = moe_layers(load_base(str(large_base)))
    adapter = _adapter(large_base, {layers[0].index: [3], layers[-1].index: [4]}, tmp_path / "law", seed=10)
    merge_tasks(str(large_base), [str(adapter)], tmp_path / "clean")

    out = tmp_path / "merged"
    staging = tmp_path / ".merged.partial"
    merging = subprocess.Popen(
        _merge_command(large_base, adapter, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not any(staging.glob("*.safetensors")) and merging.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    merging.send_signal(signal.SIGKILL)
    merging.wait()
    assert merging.returncode == -signal.SIGKILL, "the merge finished before it could be killed"
    assert not out.exists()
    finished = {path.name: path.stat().st_ino for path in staging.glob("*.safetensors")}
    assert finished

    rerun = subprocess.run(_merge_command(large_base, adapter, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} kept from the interrupted run" in rerun.stdout
    assert {name: (out / name).stat().st_ino for name in finished} == finished  # kept, not written again
    assert _files(out) == _files(tmp_path / "clean")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["clean", "law", "merged"]  # no staging, lock or plan


def test_leftovers_of_another_merge_are_not_reused_and_one_writer_at_a_time(tiny_models, tmp_path):
    base = tiny_models["qwen3_moe"]
    adapter = _adapter(base, {1: [0]}, tmp_path / "law", seed=13)
    (tmp_path / ".merged.partial").mkdir()
    (tmp_path / ".merged.partial" / "model.safetensors").write_bytes(b"a shard of another merge")
    (tmp_path / ".merged.plan").write_text("another merge")
    with (tmp_path / ".merged.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(InvalidInputError, match="another process is writing"):
            merge_tasks(str(base), [str(adapter)], tmp_path / "merged")
    result = merge_tasks(str(base), [str(adapter)], tmp_path / "merged")
    assert result.shards_resumed == 0
    _assert_same_model(tmp_path / "merged", load_model(str(base), adapter))


def test_what_a_killed_writer_left_hidden_in_the_staging_directory_is_not_published(tiny_models, tmp_path):
    base = tiny_models["qwen3_moe"]
    adapter = _adapter(base, {1: [0]}, tmp_path / "law", seed=17)
    plan = plan_merge(str(base), [str(adapter)], tmp_path / "merged")
    (tmp_path / ".merged.partial").mkdir()
    (tmp_path / ".merged.partial" / ".config.json.x1y2").write_text("{half")
    (tmp_path / ".merged.plan").write_text(plan._identity())
    plan.write()
    assert sorted(path.name for path in (tmp_path / "merged").iterdir() if path.name.startswith(".")) == []


def test_an_index_naming_files_elsewhere_and_the_working_directory_are_refused(
    tiny_models, tmp_path, run_cli, monkeypatch
):
    base = build_tiny_model("qwen3_moe", tmp_path / "base", max_shard_size="100KB")
    adapter = _adapter(base, {1: [0]}, tmp_path / "law", seed=18)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, _, err = run_cli("merge", adapter, "--base", base, "--out", ".")
    assert code == 1 and "cannot be replaced (a mount point or the working directory)" in err
    assert list((tmp_path / "here").iterdir()) == []
    index = base / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(content))
    code, _, err = run_cli("merge", adapter, "--base", base, "--out", tmp_path / "merged")
    assert code == 1 and "is not a safetensors index: its weight_map must name files beside it" in err


def _peak_rss(command: list[str]) -> int:
    """The peak resident memory of `command`, in bytes, measured by a parent that runs nothing else."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True)
    return int(done.stdout) * 1024


@pytest.mark.slow
def test_peak_memory_stays_near_the_largest_shard(large_base, tiny_models, tmp_path):
    """Side by side: merging the ~800 MB base costs less than half its largest shard more than merging a tiny one.

    A changed shard is copied by the kernel and patched a tensor at a time, so no shard passes through memory;
    reading one whole would cost a shard, and loading the model, as `load_model` + `save_pretrained` do, all four.
    """
    layers = moe_layers(load_base(str(large_base)))
    adapter = _adapter(large_base, {layer.index: [7] for layer in layers}, tmp_path / "law", seed=11)
    tiny = tiny_models["qwen3_moe"]
    tiny_adapter = _adapter(tiny, _every_layer(tiny, [7]), tmp_path / "tiny-law", seed=11)
    baseline = _peak_rss(_merge_command(tiny, tiny_adapter, tmp_path / "tiny-merged"))
    peak = _peak_rss(_merge_command(large_base, adapter, tmp_path / "merged"))
    total = sum(path.stat().st_size for path in large_base.glob("*.safetensors"))
    largest = _largest_shard(large_base)
    print(
        f"merge peak RSS {peak / 2**20:.0f} MiB; tiny base {baseline / 2**20:.0f} MiB; largest shard "
        f"{largest / 2**20:.0f} MiB of {total / 2**20:.0f} MiB"
    )
    assert total > 3 * largest
    assert peak - baseline < 0.5 * largest
