"""The `expert-hub` command line: the happy paths, and one clear line with a non-zero exit on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from expert_hub.scores import ExpertScores
from expert_hub.selection import ExpertSelection


def test_score_routing_logs_then_select(run_cli, tmp_path, esft_data):
    code, out, _ = run_cli(
        "score", "--routing-logs", esft_data / "routing_logs/law", "--top-k", 6, "-o", tmp_path / "s.json"
    )
    assert code == 0 and "8,327 tokens over 3 MoE layers" in out
    published = json.loads((esft_data / "expert_scores/law/summary.json").read_text())
    scores = ExpertScores.load(tmp_path / "s.json")
    assert {str(e): round(v, 4) for e, v in scores.gate_scores[13].items()} == published["gate_scores"]["13"]

    code, out, _ = run_cli(
        "select",
        esft_data / "expert_scores/law/summary.json",
        "--by",
        "token",
        "--top-p",
        0.2,
        "-o",
        tmp_path / "cfg.json",
    )
    assert code == 0 and "153 experts over 26 layers" in out
    assert json.loads((tmp_path / "cfg.json").read_text()) == json.loads(
        (esft_data / "expert_configs/law.json").read_text()
    )


def test_score_a_model_on_task_data_then_select_and_inspect(run_cli, tmp_path, tiny_models, esft_data):
    model = tiny_models["deepseek_v3"]
    code, out, err = run_cli(
        "score",
        "--base",
        model,
        "--data",
        esft_data / "datasets/train/law.jsonl",
        "--tokens",
        1500,
        "--seq-len",
        256,
        "-o",
        tmp_path / "s.json",
    )
    assert code == 0, err
    scores = ExpertScores.load(tmp_path / "s.json")
    assert scores.source["model"] == str(model) and scores.top_k == 2
    assert {c.tokens for c in scores.counts.values()} == {1500}

    code, out, _ = run_cli(
        "select", tmp_path / "s.json", "--by", "gate", "-o", tmp_path / "cfg.json", "--shared-experts"
    )
    selection = ExpertSelection.load(tmp_path / "cfg.json")
    assert code == 0 and selection.shared_experts and sorted(selection.experts) == [1, 2, 3]

    code, out, _ = run_cli("inspect", model)
    assert code == 0 and "deepseek_v3" in out and "4 (3 MoE: 1-3)" in out
    code, out, _ = run_cli("inspect", model, "--json")
    assert json.loads(out)["moe_layers"] == [1, 2, 3]


def test_inspect_an_adapter(run_cli, tmp_path, tiny_models):
    from expert_hub import ExpertAdapter
    from expert_hub.models import load_base

    adapter = ExpertAdapter.from_model(
        load_base(str(tiny_models["gpt_oss"])), ExpertSelection({0: [1, 2], 3: [5]}), task="law"
    )
    adapter.save(tmp_path / "law")
    code, out, _ = run_cli("inspect", tmp_path / "law")
    assert code == 0 and "3 experts" in out and "law" in out
    code, out, _ = run_cli("inspect", tmp_path / "law", "--json")
    assert json.loads(out)["bytes"] == adapter.nbytes and json.loads(out)["experts"]["experts"] == {
        "0": [1, 2],
        "3": [5],
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["select", "{tmp}/missing.json", "-o", "{tmp}/c.json"], "file not found"),
        (["select", "{summary}", "--top-p", "1.5", "-o", "{tmp}/c.json"], "top-p must be in (0, 1]"),
        (["select", "{summary}", "--top-p", "0", "-o", "{tmp}/c.json"], "top-p must be in (0, 1]"),
        (["select", "{summary}", "--by", "loss", "-o", "{tmp}/c.json"], "'loss' is not one of"),
        (["select", "{bad_json}", "-o", "{tmp}/c.json"], "not valid JSON"),
        (["score", "--base", "{model}", "--data", "{tmp}/missing.jsonl", "-o", "{tmp}/s.json"], "data file not found"),
        (["score", "--base", "{model}", "--data", "{bad_jsonl}", "-o", "{tmp}/s.json"], "bad.jsonl:2:"),
        (["score", "--base", "{tmp}", "--data", "{good_jsonl}", "-o", "{tmp}/s.json"], "cannot load model"),
        (["score", "--routing-logs", "{tmp}", "-o", "{tmp}/s.json"], "needs --top-k"),
        (["score", "-o", "{tmp}/s.json"], "give --data FILE (no --task given"),
        (["score", "--task", "poems", "-o", "{tmp}/s.json"], "'poems' is not a built-in task"),
        (["eval", "--task", "poems"], "'poems' is not a built-in task"),
        (["quickstart", "--tasks", "poems"], "--tasks takes built-in tasks"),
        (["score", "--tokens", "0", "-o", "{tmp}/s.json"], "--tokens"),
        (["inspect", "{tmp}/no-such-model"], "cannot load model"),
        (["select", "--frobnicate"], "No such option"),
        (["select", "{summary}", "-o", "{tmp}"], "is a directory"),
        (["select", "{summary}", "-o", "{tmp}/bad.json/c.json"], "not a writable directory"),
        (["score", "--base", "{model}", "--data", "{latin1}", "-o", "{tmp}/s.json"], "latin1.jsonl:2: not UTF-8"),
        (
            ["score", "--base", "{model}", "--data", "{good_jsonl}", "--device", "tpu9", "-o", "{tmp}/s.json"],
            "device 'tpu9'",
        ),
        (["score", "--routing-logs", "{tmp}", "--top-k", "2", "-o", "{tmp}/s.json"], "no expert_weights"),
        (["serve", "--base", "{model}", "--tasks", "nosuch"], "no registered task 'nosuch'"),
        (["serve", "--base", "{model}", "--tasks", "law={tmp}/missing"], "has no expert_cfg.json"),
        (["serve", "--base", "{model}", "--tasks", "../x"], "invalid task name"),
        (["serve", "--base", "{model}", "--expert-bank-gb", "0"], "--expert-bank-gb must be positive"),
        (["serve", "--base", "{gpt_oss}"], "gpt_oss experts have biases"),
        (["serve", "--base", "{model}", "--expert-bank-gb", "1", "--expert-bank-rows", "8"], "not both"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(run_cli, tmp_path, tiny_models, esft_data, args, message):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n{"messages": 5}\n')
    (tmp_path / "good.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    (tmp_path / "latin1.jsonl").write_bytes(b'{"messages": [{"role": "user", "content": "q"}]}\n{"x": "\xe9"}\n')
    values = {
        "tmp": tmp_path,
        "summary": esft_data / "expert_scores/law/summary.json",
        "model": tiny_models["olmoe"],
        "gpt_oss": tiny_models["gpt_oss"],
        "bad_json": tmp_path / "bad.json",
        "bad_jsonl": tmp_path / "bad.jsonl",
        "good_jsonl": tmp_path / "good.jsonl",
        "latin1": tmp_path / "latin1.jsonl",
    }
    code, out, err = run_cli(*[arg.format(**values) for arg in args])
    assert code != 0
    # One error line, last; a progress bar may precede it when the problem shows up mid-stream.
    assert err.endswith("\n") and err.splitlines()[-1].startswith("error: ") and err.count("error: ") == 1, err
    assert message in err.splitlines()[-1] and "Traceback" not in out + err


@pytest.mark.slow
def test_installed_console_script():
    script = Path(sys.executable).with_name("expert-hub")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("score", "select", "inspect"):
        assert command in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "expert_hub.cli", "select", "--top-p", "2"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr == "error: Missing argument 'SCORES.json'.\n"


def test_the_conventions_a_shell_user_expects(run_cli, tmp_path):
    script = Path(sys.executable).with_name("expert-hub")
    bare = subprocess.run([script], capture_output=True, text=True, timeout=120)
    assert "Usage: expert-hub" in bare.stdout + bare.stderr and "error:" not in bare.stdout + bare.stderr
    for args in (["-h"], ["train", "-h"]):
        code, out, _ = run_cli(*args)
        assert code == 0 and "Usage: " in out and "--help" in out
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"expert-hub {__import__('importlib.metadata').metadata.version('expert-hub')}"
    # in a process of its own, as a shell asks: in-process, the script sometimes bypassed the captured output
    completion = subprocess.run([script, "--show-completion", "bash"], capture_output=True, text=True, timeout=120)
    assert completion.returncode == 0 and "complete -o default -F" in completion.stdout
    code, out, _ = run_cli("tasks", "export", "law", tmp_path / "out[bold]x")  # a path is never read as markup
    assert code == 0 and f"{tmp_path}/out[bold]x/train.jsonl" in out


def test_train_offers_every_training_setting_as_an_option(run_cli):
    """The options are made from `TrainingConfig`'s fields: a field with CLI metadata is an option."""
    from dataclasses import fields

    from expert_hub.training import TrainingConfig

    code, out, _ = run_cli("train", "--help")
    assert code == 0
    for field in fields(TrainingConfig):
        if field.metadata["cli"]:
            for flag in field.metadata["flags"] or (f"--{field.name.replace('_', '-')}",):
                assert flag in out, flag
    assert "--no-lora-experts" in out and "--processes" not in out
    assert "[default: 1e-5 (esft-token, esft-gate, esft, full), 1e-4 (lora); the demo base: 0.003]" in " ".join(
        out.split()
    )


def test_a_runtime_error_is_one_line(run_cli, monkeypatch, tmp_path, tiny_models):
    """torch reports out-of-memory as a RuntimeError: the user sees it as one line, not a traceback."""
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr("expert_hub.training.loop.load_base", out_of_memory)
    code, _, err = run_cli(
        "train", "--task", "law", "--base", tiny_models["qwen3_moe"], "--out", tmp_path / "run", "--seq-len", "64"
    )
    assert code == 1 and "Traceback" not in err and "more details" not in err
    assert err.strip().splitlines()[-1] == "error: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_a_bug_is_one_line_that_says_so_and_its_traceback_is_kept_to_report(run_cli, monkeypatch, registry_home):
    def broken(*args, **kwargs):
        raise KeyError("layer")

    monkeypatch.setattr("expert_hub.registry.Registry.entries", broken)
    code, _, err = run_cli("list")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: KeyError: 'layer'; this is a bug in expert-hub: please report it with ")
    (report,) = (registry_home / "bug-reports").iterdir()
    assert str(report) in err
    text = report.read_text()
    assert text.startswith("expert-hub list\n") and "Traceback" in text and 'raise KeyError("layer")' in text


@pytest.mark.parametrize("how", ["--debug", "EXPERT_HUB_DEBUG"])
def test_debug_lets_the_error_through_with_its_traceback(run_cli, monkeypatch, how):
    from expert_hub.errors import InvalidInputError

    def refused(*args, **kwargs):
        raise InvalidInputError("a refusal")

    monkeypatch.setattr("expert_hub.registry.Registry.entries", refused)
    if how == "EXPERT_HUB_DEBUG":
        monkeypatch.setenv("EXPERT_HUB_DEBUG", "1")
    with pytest.raises(InvalidInputError, match="a refusal"):
        run_cli(*(["--debug"] if how == "--debug" else []), "list")
    monkeypatch.delenv("EXPERT_HUB_DEBUG", raising=False)
    assert run_cli("list")[2] == "error: a refusal\n"  # the next run is not in debug mode


def test_workers_that_disagree_are_reported_as_a_bug(run_cli, monkeypatch):
    from expert_hub.serving.bank_client import WorkersDisagreeError

    def disagree(*args, **kwargs):
        raise WorkersDisagreeError("the tensor-parallel ranks answered expert_hub_load_task differently")

    monkeypatch.setattr("expert_hub.registry.Registry.entries", disagree)
    code, _, err = run_cli("list")
    assert code == 1 and "this is a bug in expert-hub: please report it with " in err


def test_importing_the_library_leaves_transformers_unloaded():
    """vLLM imports the serving plugin, and with it `expert_hub`, in every process it starts: that stays quick."""
    probe = "import sys, expert_hub, expert_hub.serving.bank; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"
