"""Training checkpoints: trainable weights, optimizer state, RNG and progress, written atomically.

A checkpoint is a directory `checkpoints/step-000100/` that appears by atomic rename once complete, so a run
killed at any moment (Ctrl-C, `kill -9`) leaves only whole checkpoints behind. Everything is safetensors or
JSON — never pickle. Only trainable tensors are stored: for ESFT that is the selected experts' rows.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import fsync_tree, publish_permissions, read_json, replace_directory, write_json_atomic

_STEP_DIR = re.compile(r"step-(\d+)")


def save_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    progress: dict, keep: int) -> Path:
    """Write checkpoint `step` under `root`, then drop all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".staging-*"):  # from a run killed while writing (one writer per run directory)
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        save_file({name: tensor.detach().contiguous() for name, tensor in trainable.items()}, staging / "trainable.safetensors")
        tensors, layout = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, staging / "optimizer.safetensors")
        save_file(_rng_state(), staging / "rng.safetensors")
        write_json_atomic(staging / "optimizer.json", layout)
        write_json_atomic(staging / "progress.json", {"step": step, **progress})
        publish_permissions(staging)
        fsync_tree(staging)
        replace_directory(staging, root / f"step-{step:06d}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := _STEP_DIR.fullmatch(path.name))]
    return [path for _, path in sorted(found)]


def load_checkpoint(path: Path, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG in place; returns the saved progress (`step`, ...)."""
    saved = load_file(path / "trainable.safetensors")
    if set(saved) != set(trainable):
        raise RuntimeError(f"{path} holds other trainable tensors than this run ({len(saved)} vs {len(trainable)})")
    with torch.no_grad():
        for name, tensor in trainable.items():
            tensor.copy_(saved[name])
    optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"),
                                                   read_json(path / "optimizer.json")))
    _set_rng_state(load_file(path / "rng.safetensors"))
    return read_json(path / "progress.json")


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *layout["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [dict(group, betas=tuple(group["betas"])) if "betas" in group else group for group in layout["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[key] for key in sorted(k for k in state if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
