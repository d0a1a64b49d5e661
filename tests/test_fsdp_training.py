"""`--sharding fsdp`: two CPU processes (gloo) train what one process trains, resume after a kill, refuse the rest.

Run as a script under torchrun, this file is one rank of a sharded run (see `_sharded_rank`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from expert_hub import ExpertAdapter, ExpertSelection
from expert_hub.errors import InvalidInputError
from expert_hub.models import load_base
from expert_hub.training import TrainingConfig, get_method, train
from expert_hub.training.methods import RunContext

# What every run here trains: the two-process runs take 2 micro-batches per rank, the single process 4.
RUN = dict(
    task="law",
    method="esft-token",
    steps=4,
    seq_len=64,
    batch_size=2,
    grad_accumulation=2,
    learning_rate=1e-3,
    score_tokens=1500,
    save_every=2,
    eval_every=2,
    eval_fraction=0.1,
    gradient_checkpointing=False,
    sharding="fsdp",
)

pytestmark = pytest.mark.slow  # torchrun: `make test-fast` leaves it out
ENVIRONMENT = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2"]


def _settings(tiny_models, esft_data, out: Path) -> dict:
    data = esft_data / "datasets/train/law.jsonl"
    return RUN | {"base": str(Path(tiny_models["deepseek_v2"]).resolve()), "data": str(data), "out": str(out)}


def _rank_command(settings: dict) -> list[str]:
    return [*TORCHRUN, __file__, json.dumps(settings)]


def _cli_command(settings: dict) -> list[str]:
    """The same run through `expert-hub train`, flag by flag."""
    flags = {"learning_rate": "--lr"}
    command = [*TORCHRUN, "-m", "expert_hub.cli", "train", "--no-register"]
    for name, value in settings.items():
        flag = flags.get(name, f"--{name.replace('_', '-')}")
        command += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    return command


@pytest.fixture(scope="module")
def sharded_run(tiny_models, esft_data, tmp_path_factory) -> Path:
    """One uninterrupted two-process FSDP run."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    finished = subprocess.run(
        _rank_command(_settings(tiny_models, esft_data, out)),
        capture_output=True,
        text=True,
        env=ENVIRONMENT,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out


def test_two_sharded_processes_train_what_one_process_trains(sharded_run, tiny_models, esft_data, tmp_path):
    single = train(
        TrainingConfig(
            **_settings(tiny_models, esft_data, tmp_path / "single") | {"grad_accumulation": 4, "sharding": "ddp"}
        )
    )
    sharded, reference = ExpertAdapter.load(sharded_run / "adapter"), ExpertAdapter.load(single.artifact)
    assert sharded.selection == reference.selection and sharded.tensors.keys() == reference.tensors.keys()
    for key, tensor in reference.tensors.items():
        torch.testing.assert_close(sharded.tensors[key], tensor, msg=key)
    assert sharded.metadata.base_fingerprint == reference.metadata.base_fingerprint
    assert sharded.metadata.training["shipped_step"] == reference.metadata.training["shipped_step"]
    assert json.loads((sharded_run / "frozen-changed.json").read_text()) == []  # every rank's gathered base
    # the checkpoints hold full tensors, as one process writes them: the selected rows and their AdamW moments
    shapes = _checkpoint_shapes(sharded_run)
    assert shapes == _checkpoint_shapes(single.artifact.parent)
    assert all(".esft_rows.weights." in key for key in shapes["trainable.safetensors"])


def test_a_killed_sharded_run_resumes_where_an_uninterrupted_one_ends(sharded_run, tiny_models, esft_data, tmp_path):
    """The same experts, given (`--method esft`), and recomputed activations: the same rows, trained the same."""
    given = {"method": "esft", "experts": str(sharded_run / "expert_cfg.json"), "gradient_checkpointing": True}
    settings = _settings(tiny_models, esft_data, tmp_path / "killed") | given
    victim = subprocess.Popen(
        _rank_command(settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENVIRONMENT
    )
    checkpoints, deadline = tmp_path / "killed" / "checkpoints", time.monotonic() + 120
    while not (checkpoints / "step-000002").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # kill -9 torchrun and both ranks at once (torchrun starts each rank in a session of its own)
    processes = [*psutil.Process(victim.pid).children(recursive=True), psutil.Process(victim.pid)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes)
    victim.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it could be killed"
    killed_at = max(int(path.name.split("-")[1]) for path in checkpoints.glob("step-*"))
    rerun = subprocess.run(_cli_command(settings), capture_output=True, text=True, env=ENVIRONMENT, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed at step {killed_at}" in rerun.stdout
    whole, resumed = ExpertAdapter.load(sharded_run / "adapter"), ExpertAdapter.load(tmp_path / "killed" / "adapter")
    assert whole.tensors.keys() == resumed.tensors.keys()
    assert all(torch.equal(whole.tensors[key], resumed.tensors[key]) for key in whole.tensors)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_refuses_the_baselines_up_front(tiny_models, esft_data, tmp_path, method):
    with pytest.raises(InvalidInputError, match=f"ESFT methods only; train --method {method} with --sharding ddp"):
        TrainingConfig(**_settings(tiny_models, esft_data, tmp_path / "run") | {"method": method})


def test_fsdp_needs_several_processes_and_a_resume_the_same_sharding(tiny_models, esft_data, tmp_path):
    settings = _settings(tiny_models, esft_data, tmp_path / "run")
    with pytest.raises(InvalidInputError, match="launch several with torchrun"):
        train(TrainingConfig(**settings))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(TrainingConfig(**settings).to_json()))
    with pytest.raises(InvalidInputError, match="sharding: 'fsdp' -> 'ddp'"):
        train(TrainingConfig(**settings | {"sharding": "ddp"}))


def test_fsdp_refuses_shared_experts_and_non_expert_modules(tiny_models, esft_data, tmp_path):
    experts = tmp_path / "cfg.json"
    ExpertSelection({1: [0, 3]}, shared_experts=True).save(experts)
    config = TrainingConfig(
        **_settings(tiny_models, esft_data, tmp_path / "run") | {"method": "esft", "experts": str(experts)}
    )
    method, base = get_method("esft")(config), load_base(config.base)
    with pytest.raises(InvalidInputError, match="routed experts only.*use --sharding ddp"):
        method.prepare(base, RunContext(tmp_path / "run", None, None, print))


def _checkpoint_shapes(run: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    files = (run / "checkpoints" / "step-000004").glob("*.safetensors")
    return {file.name: {key: tuple(tensor.shape) for key, tensor in load_file(file).items()} for file in files}


def _sharded_rank(settings: dict) -> None:
    """Train, then check on every rank that the frozen base, gathered from the shards, is the base it loaded."""
    result = train(TrainingConfig(**settings))
    base = dict(load_base(settings["base"], dtype=torch.float32).named_parameters())
    changed = [
        name
        for name, parameter in result.model.named_parameters()
        if not parameter.requires_grad and not torch.equal(parameter.full_tensor(), base[name])
    ]
    if result.main_process:
        (Path(settings["out"]) / "frozen-changed.json").write_text(json.dumps(changed))


if __name__ == "__main__":  # one rank of a sharded run, started by torchrun from the tests above
    _sharded_rank(json.loads(sys.argv[1]))
