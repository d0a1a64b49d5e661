"""push / pull through the real huggingface_hub client, against a Hub-protocol server on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from expert_hub import ExpertAdapter, ExpertSelection, load_model
from expert_hub.models import load_base
from expert_hub.registry import Registry
from expert_hub.registry.hub import HubError, pull, push

from .conftest import TOKEN


@pytest.fixture
def registered(tiny_models, tmp_path):
    base = tiny_models["qwen3_moe"]
    adapter = ExpertAdapter.from_model(
        load_base(str(base)),
        ExpertSelection({1: [2, 5], 3: [0]}),
        task="law",
        method="esft-token",
        score_function="token",
        top_p=0.2,
        metrics={"eval_loss": 1.25},
    )
    generator = torch.Generator().manual_seed(3)
    adapter.tensors = {k: torch.randn(v.shape, generator=generator) for k, v in adapter.tensors.items()}
    registry = Registry(tmp_path / "first")
    return base, registry, registry.register(adapter.save(tmp_path / "adapter"))


def test_push_then_pull_into_another_registry(hub, registered, tmp_path):
    base, first, entry = registered
    url = push(first, "law", "acme/law-experts", private=True)
    assert "acme/law-experts" in url
    second = Registry(tmp_path / "second")
    pulled = pull(second, "acme/law-experts", base=str(base))  # a local base is not published: name it on pull
    assert (pulled.task, pulled.version, pulled.base_model) == ("law", 1, entry.base_model)
    original, copy = first.verify(entry), second.verify(pulled)
    for name in ("expert_cfg.json", "experts.safetensors"):
        assert (copy / name).read_bytes() == (original / name).read_bytes()
    assert second.load("law").metadata == replace(first.load("law").metadata, base_model=None)
    input_ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(
            load_model(str(base), first.load("law"))(input_ids).logits,
            load_model(str(base), second.load("law"))(input_ids).logits,
        )


def test_pull_registers_what_prepare_adds_in_one_version(hub, registered, tmp_path):
    """`pull --profile-data` adds the routing profile to the download before it is registered."""
    _, first, _ = registered
    push(first, "law", "acme/law-experts")
    second = Registry(tmp_path / "second")
    pulled = pull(second, "acme/law-experts", prepare=lambda directory: (directory / "extra.json").write_text("{}"))
    assert pulled.ref == "law@1" and (second.verify(pulled) / "extra.json").read_text() == "{}"
    assert [entry.ref for entry in second.entries()] == ["law@1"]


def test_pull_refuses_the_reserved_task_name_auto(hub, registered, run_cli):
    _, first, _ = registered
    push(first, "law", "acme/law-experts")
    code, _, err = run_cli("pull", "acme/law-experts", "--task", "auto")
    assert code == 1 and err.strip() == (
        'error: the task name "auto" is reserved: "model": "auto" asks the server to choose a task'
    )
    assert Registry().entries() == []


def test_the_model_card(hub, registered, tmp_path):
    _, first, _ = registered
    push(first, "law", "acme/law-experts", license="apache-2.0")
    card = _pulled_file(hub, "acme/law-experts", "README.md").decode()
    _, front, body = card.split("---", 2)
    metadata = yaml.safe_load(front)
    assert metadata["base_model_relation"] == "adapter" and metadata["library_name"] == "expert-hub"
    assert metadata["tags"] == ["esft", "moe", "law"] and metadata["license"] == "apache-2.0"
    assert "3 over 2 MoE layers" in body and "top-p 0.2" in body and "eval_loss 1.25" in body
    assert "expert-hub pull acme/law-experts" in body and "--tasks law" in body


def test_branches_and_revisions(hub, registered, tmp_path):
    _, first, _ = registered
    push(first, "law", "acme/law-experts", revision="v2", commit_message="second cut")
    assert any(path.endswith("/branch/v2") for _, path in hub.state.log)
    with pytest.raises(HubError, match="not found"):
        pull(Registry(tmp_path / "x"), "acme/law-experts", revision="v9")
    assert pull(Registry(tmp_path / "second"), "acme/law-experts", revision="v2").ref == "law@1"


def test_a_published_esft_repo_pulls_with_a_task_name(hub, tiny_models, tmp_path):
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    adapter = ExpertAdapter.from_model(load_base(str(tiny_models["deepseek_v2"])), ExpertSelection({1: [3], 2: [0]}))
    published = tmp_path / "ESFT-token-law-lite"
    published.mkdir()
    keys = sorted(adapter.tensors)
    save_file(
        {k.removeprefix("model."): adapter.tensors[k].bfloat16() for k in keys[:3]},
        published / "model-00001-of-00002.safetensors",
    )
    save_file({k: adapter.tensors[k].bfloat16() for k in keys[3:]}, published / "model-00002-of-00002.safetensors")
    (published / "expert_cfg.json").write_text(json.dumps(adapter.selection.to_json()))
    (published / "config.json").write_text((tiny_models["deepseek_v2"] / "config.json").read_text())
    api = HfApi()
    api.create_repo("deepseek-ai/ESFT-token-law-lite")
    api.upload_folder(repo_id="deepseek-ai/ESFT-token-law-lite", folder_path=published)
    registry = Registry(tmp_path / "registry")
    entry = pull(registry, "deepseek-ai/ESFT-token-law-lite", base=str(tiny_models["deepseek_v2"]))
    assert entry.task == "ESFT-token-law-lite"
    renamed = pull(registry, "deepseek-ai/ESFT-token-law-lite", task="law", base=str(tiny_models["deepseek_v2"]))
    assert renamed.ref == "law@1"
    load_model(str(tiny_models["deepseek_v2"]), registry.load("law"))


def test_hub_errors_are_one_line_and_leave_the_registry_alone(hub, registered, tmp_path, monkeypatch):
    _, first, _ = registered
    second = Registry(tmp_path / "second")
    second.register(first.verify(first.resolve("law")), task="kept")
    before = (tmp_path / "second" / "index.json").read_bytes()
    with pytest.raises(HubError, match="repository acme/missing not found"):
        pull(second, "acme/missing")
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(HubError, match=r"HTTP 401.*check HF_TOKEN"):
        push(first, "law", "acme/law-experts")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="no Hugging Face token|HTTP 401"):
        push(first, "law", "acme/law-experts")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.state.fail_commits = True
    with pytest.raises(HubError, match="commit failed"):
        push(first, "law", "acme/law-experts")
    from huggingface_hub import constants

    with socket.socket() as closed:  # a port nothing listens on: the network is down
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", down)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", down + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(HubError, match="cannot (reach the Hub|download)"):
        pull(second, "acme/law-experts")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push(first, "law", "acme/law-experts")
    assert (tmp_path / "second" / "index.json").read_bytes() == before


@pytest.mark.slow
def test_the_cli_honours_hf_endpoint_and_hf_token(hub, registered, tmp_path, registry_home):
    """A fresh process reads HF_ENDPOINT and HF_TOKEN itself, as a user's shell would set them."""
    _, first, _ = registered
    script = Path(sys.executable).with_name("expert-hub")
    environment = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"} | {
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_XET": "1",
        "EXPERT_HUB_HOME": str(first.root),
    }
    done = subprocess.run(
        [str(script), "push", "law", "--repo", "acme/cli"], capture_output=True, text=True, env=environment, timeout=300
    )
    assert done.returncode == 0, done.stderr
    environment["EXPERT_HUB_HOME"] = str(tmp_path / "elsewhere")
    done = subprocess.run(
        [str(script), "pull", "acme/cli", "--task", "cli-law"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0 and "Pulled acme/cli as cli-law@1" in done.stdout, done.stderr
    done = subprocess.run(
        [str(script), "pull", "acme/nothing"], capture_output=True, text=True, env=environment, timeout=300
    )
    assert (
        done.returncode == 1
        and done.stderr == "error: repository acme/nothing not found, or your token cannot access it\n"
    )


def _pulled_file(hub, repo: str, name: str) -> bytes:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, name)).read_bytes()


@pytest.mark.parametrize("repo_id", ["not a repo", "a/b/c", "acme/../law", "-acme/law"])
def test_an_invalid_repo_id_is_one_line(hub, registered, run_cli, repo_id):
    _, first, _ = registered
    with pytest.raises(HubError, match=r"invalid repository id .*: use ORG/NAME"):
        push(first, "law", repo_id)
    with pytest.raises(HubError, match=r"invalid repository id .*: use ORG/NAME"):
        pull(first, repo_id)
    code, _, err = run_cli("pull", "--", repo_id)
    assert code == 1 and err.count("\n") == 1 and "invalid repository id" in err


def test_pull_registers_plain_files_not_the_cache_symlinks(hub, registered, tmp_path):
    """snapshot_download's cache is symlinks to blobs, which import refuses; pull downloads plain files instead."""
    _, first, entry = registered
    push(first, "law", "acme/law-experts")
    second = Registry(tmp_path / "second")
    pulled = pull(second, "acme/law-experts")
    assert pulled.experts == entry.experts and pulled.bytes > entry.bytes  # plus the model card
    assert not any(path.is_symlink() for path in second.verify(pulled).iterdir())


def test_push_publishes_no_local_paths(hub, tiny_models, tmp_path, run_cli):
    base = tiny_models["qwen3_moe"]
    training = {
        "steps": 5,
        "config": {
            "base": str(base),
            "data": "/home/me/secret/law.jsonl",
            "out": "/home/me/runs/law-esft-token",
            "learning_rate": 1e-3,
        },
    }
    adapter = ExpertAdapter.from_model(
        load_base(str(base)), ExpertSelection({1: [2]}), task="law", base_model=str(base), training=training
    )
    Registry().register(adapter.save(tmp_path / "adapter"))
    code, _out, err = run_cli("push", "law", "--repo", "acme/law", "--base-model", "acme/tiny-moe")
    assert code == 0, err
    card, metadata = (_pulled_file(hub, "acme/law", name).decode() for name in ("README.md", "expert_hub.json"))
    for text in (card, metadata):
        assert str(tmp_path) not in text and "/home/me" not in text
    front = yaml.safe_load(card.split("---", 2)[1])
    assert front["base_model"] == "acme/tiny-moe" and front["pipeline_tag"] == "text-generation"
    published = json.loads(metadata)
    assert published["base_model"] == "acme/tiny-moe" and published["training"]["config"]["data"] == "law.jsonl"
    assert "law experts for acme/tiny-moe" in card and "--base acme/tiny-moe" in card
    # locally nothing changed: the entry still finds its local base
    assert Registry().load("law", base=str(base)).metadata.base_model == str(base)
    code, _, err = run_cli("pull", "acme/law", "--task", "law-hub")
    assert code == 0, err
    code, _, err = run_cli("show", "law-hub", "--base", str(base))
    assert code == 1 and "it is registered for acme/tiny-moe" in err and f"import DIR --base {base}" in err


def test_a_repo_with_a_file_that_climbs_out_is_refused_in_one_line(hub, registered, tmp_path, run_cli):
    _, first, _ = registered
    push(first, "law", "acme/law-experts")
    repo = hub.state.repos["acme/law-experts"]
    repo.commits[repo.branches["main"]]["files"]["../../escaped.txt"] = b"outside"
    second = Registry(tmp_path / "second")
    with pytest.raises(HubError, match="cannot download acme/law-experts"):
        pull(second, "acme/law-experts")
    assert second.entries() == [] and not list(tmp_path.rglob("escaped.txt"))
