"""`expert-hub train` and `expert-hub eval` end to end, including a run killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from expert_hub import ExpertAdapter, ExpertSelection
from expert_hub.registry import Registry

pytestmark = pytest.mark.slow  # whole training runs through the CLI: `make test-fast` leaves it out

SMALL_RUN = [
    "--steps",
    "4",
    "--seq-len",
    "64",
    "--batch-size",
    "2",
    "--grad-accumulation",
    "2",
    "--score-tokens",
    "1500",
    "--save-every",
    "2",
    "--eval-every",
    "2",
    "--lr",
    "1e-3",
    "--no-gradient-checkpointing",
]


@pytest.mark.parametrize("method", ["esft-token", "esft-gate", "full", "lora"])
def test_every_method_trains_and_its_output_evaluates(run_cli, tmp_path, tiny_models, esft_data, method):
    base = tiny_models["qwen2_moe"]
    code, out, err = run_cli(
        "train",
        "--task",
        "law",
        "--base",
        base,
        "--data",
        esft_data / "datasets/train/law.jsonl",
        "--method",
        method,
        "--out",
        tmp_path / "run",
        *SMALL_RUN,
    )
    assert code == 0, err
    assert "Trained 4 steps" in out
    artifact = tmp_path / "run" / ("model" if method == "full" else "adapter")
    registered = [entry.ref for entry in Registry().entries()]
    assert registered == (["law@1"] if method.startswith("esft") else [])
    metadata = json.loads((artifact / "expert_hub.json").read_text())
    assert metadata["method"] == method and metadata["training"]["steps"] == 4
    eval_args = ["--base", artifact] if method == "full" else ["--base", base, "--adapter", artifact]
    code, out, err = run_cli(
        "eval", *eval_args, "--data", esft_data / "datasets/eval/law.jsonl", "--limit", 3, "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    code, out, _ = run_cli(
        "eval", "--base", base, "--data", esft_data / "datasets/eval/law.jsonl", "--limit", 3, "--json"
    )
    untrained = json.loads(out)["value"]
    assert result["metric"] == "loss" and result["count"] == 3 and result["value"] != untrained
    code, out, err = run_cli(
        "eval",
        *eval_args,
        "--data",
        esft_data / "datasets/eval/intent.jsonl",
        "--metric",
        "intent",
        "--limit",
        2,
        "--max-new-tokens",
        4,
        "--json",
    )
    assert code == 0 and json.loads(out)["count"] == 2, err


def test_eval_tells_adapters_apart(run_cli, tmp_path, tiny_models, esft_data):
    """The base alone and base + adapter score differently on the same data."""
    base = tiny_models["olmoe"]
    code, _, err = run_cli(
        "train",
        "--task",
        "law",
        "--base",
        base,
        "--data",
        esft_data / "datasets/train/law.jsonl",
        "--out",
        tmp_path / "run",
        *SMALL_RUN,
    )
    assert code == 0, err
    losses = []
    for extra in ([], ["--adapter", tmp_path / "run" / "adapter"]):
        code, out, _ = run_cli(
            "eval", "--base", base, *extra, "--data", esft_data / "datasets/eval/law.jsonl", "--limit", 4, "--json"
        )
        losses.append(json.loads(out)["value"])
    assert losses[0] != losses[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "esft"], "--method esft needs --experts"),
        (["--method", "sgd"], "'sgd' is not one of"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--data", "{tmp}/missing.jsonl"], "data file not found"),
        (["--base", "{tmp}/no-model"], "cannot load model"),
        (["--lr", "-0.1"], "--lr must be above 0, got -0.1"),
        (["--lr", "nan"], "--lr must be above 0, got nan"),
        (["--beta1", "1.5"], "--beta1 and --beta2 must be in [0, 1), got 1.5, 0.95"),
        (["--clip-grad-norm", "nan"], "--clip-grad-norm must be above 0, got nan"),
        (["--weight-decay", "inf"], "--weight-decay must be 0 or more, got inf"),
        (["--seq-len", "100000"], "--seq-len 100000 is longer than the model's"),
        (["--task", "../x"], "invalid task name '../x'"),
        # options that size memory are bounded before anything is written, not met by a MemoryError
        (["--mix-data", "{law}", "--mix-ratio", "1e9"], "Invalid value for '--mix-ratio'"),
        (["--batch-size", "1000000000"], "--batch-size 1000000000 is more than the"),
        (["--method", "lora", "--lora-rank", "100000"], "--lora-rank 100000 is above the model's hidden size (64)"),
    ],
)
def test_train_bad_input_is_one_line(run_cli, tmp_path, tiny_models, esft_data, args, message):
    values = {"tmp": tmp_path, "law": esft_data / "datasets/train/law.jsonl"}
    defaults = {"--base": str(tiny_models["olmoe"]), "--data": str(esft_data / "datasets/train/law.jsonl")}
    args = [arg.format(**values) for arg in args]
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    code, _, err = run_cli("train", "--task", "law", "--out", tmp_path / "run", *SMALL_RUN, *args)  # args win
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "x-esft-token").exists()  # nothing written


def test_an_unwritable_registry_is_refused_before_training(run_cli, tmp_path, tiny_models, esft_data, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("EXPERT_HUB_HOME", str(tmp_path / "a-file" / "registry"))
    code, _, err = run_cli(
        "train",
        "--task",
        "law",
        "--out",
        tmp_path / "run",
        "--base",
        tiny_models["olmoe"],
        "--data",
        esft_data / "datasets/train/law.jsonl",
        *SMALL_RUN,
    )
    assert code == 1 and "cannot write the registry at" in err and "--no-register" in err
    assert not (tmp_path / "run").exists()


def test_sigkill_mid_run_then_the_same_command_resumes(tmp_path, tiny_models, esft_data):
    """kill -9 after a checkpoint: the rerun resumes there and ends with the weights of an uninterrupted run."""
    script = Path(sys.executable).with_name("expert-hub")

    def command(out):
        return [
            str(script),
            "train",
            "--task",
            "law",
            "--base",
            str(tiny_models["deepseek_v3"]),
            "--data",
            str(esft_data / "datasets/train/law.jsonl"),
            "--out",
            str(out),
            "--steps",
            "40",
            "--seq-len",
            "256",
            "--batch-size",
            "2",
            "--grad-accumulation",
            "4",
            "--score-tokens",
            "1500",
            "--save-every",
            "5",
            "--lr",
            "1e-3",
            "--no-gradient-checkpointing",
        ]

    environment = os.environ | {"HF_HUB_OFFLINE": "1"}
    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True, env=environment, timeout=600)
    victim = subprocess.Popen(
        command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment
    )
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "step-000010").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it could be killed"
    killed_at = max(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    rerun = subprocess.run(command(tmp_path / "killed"), capture_output=True, text=True, env=environment, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed at step {killed_at}" in rerun.stdout
    whole, resumed = (ExpertAdapter.load(tmp_path / run / "adapter") for run in ("whole", "killed"))
    assert whole.tensors.keys() == resumed.tensors.keys()
    assert all(torch.equal(whole.tensors[key], resumed.tensors[key]) for key in whole.tensors)


def test_data_parallel_training_through_torchrun(tmp_path, tiny_models, esft_data):
    """Two processes (gloo on the CPU) train one model; only rank 0 reports and writes."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "-m",
        "expert_hub.cli",
        "train",
        "--task",
        "law",
        "--base",
        str(tiny_models["qwen3_moe"]),
        "--data",
        str(esft_data / "datasets/train/law.jsonl"),
        "--out",
        str(tmp_path / "run"),
        *SMALL_RUN,
    ]
    finished = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.count("Trained 4 steps") == 1
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    adapter = ExpertAdapter.load(tmp_path / "run" / "adapter")
    assert adapter.metadata.training["steps"] == 4 and adapter.selection.pairs


def test_a_relative_base_is_recorded_as_an_absolute_path(run_cli, tmp_path, tiny_models, esft_data, monkeypatch):
    """Artifacts must find their base from any directory (PEFT would take `w/base` for a Hub id)."""
    base = tiny_models["olmoe"]
    monkeypatch.chdir(base.parent)
    code, _, err = run_cli(
        "train",
        "--task",
        "law",
        "--method",
        "lora",
        "--out",
        tmp_path / "run",
        "--base",
        base.name,
        "--data",
        esft_data / "datasets/train/law.jsonl",
        *SMALL_RUN,
    )
    assert code == 0, err
    adapter_config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base)
    assert json.loads((tmp_path / "run/train_config.json").read_text())["base"] == str(base)


def test_experts_is_stored_as_a_normalised_path(run_cli, tmp_path, tiny_models, esft_data, monkeypatch):
    """`--experts ./sel//cfg.json` and `--experts sel/cfg.json` are the same run: a rerun with either resumes."""
    (tmp_path / "sel").mkdir()
    ExpertSelection({1: [0, 3]}).save(tmp_path / "sel" / "cfg.json")
    monkeypatch.chdir(tmp_path)
    common = [
        "train",
        "--task",
        "law",
        "--base",
        tiny_models["qwen3_moe"],
        "--data",
        esft_data / "datasets/train/law.jsonl",
        "--method",
        "esft",
        "--out",
        "run",
        "--no-register",
        *SMALL_RUN,
    ]
    code, _, err = run_cli(*common, "--experts", "./sel//cfg.json")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["experts"] == "sel/cfg.json"
    code, out, err = run_cli(*common, "--experts", "sel/cfg.json", "--steps", "5")
    assert code == 0 and "resumed at step 4" in out, err
