"""Training checkpoints: trainable weights, optimizer state, RNG and progress, written atomically.

A checkpoint is a directory `checkpoints/step-000100/` that appears by atomic rename once complete, so a run
killed at any moment (Ctrl-C, `kill -9`) leaves only whole checkpoints behind. Everything is safetensors or
JSON — never pickle. Only trainable tensors are stored: for ESFT that is the selected experts' rows. They are
always full tensors: a sharded run (`sharding.py`) gathers them first, and every rank takes its shard on loading.

`best/` holds the trainable tensors of the step with the lowest held-out loss so far (as the reference's
`load_best_model_at_end`), written the same way; the checkpoints record which step that is, so a resumed run
knows its best without re-evaluating.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import InvalidInputError
from ..io import (
    atomic_directory,
    first_line,
    fsync_tree,
    publish_permissions,
    read_json,
    replace_directory,
    write_json_atomic,
)
from .sharding import placed_like

_STEP_DIR = re.compile(r"step-(\d+)")


def save_checkpoint(
    root: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    progress: dict,
    keep: int,
) -> Path:
    """Write checkpoint `step` under `root` (`optimizer_state`: the optimizer's `state_dict()`), then drop all but
    the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".staging-*"):  # from a run killed while writing (one writer per run directory)
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        save_file(
            {name: tensor.detach().contiguous() for name, tensor in trainable.items()},
            staging / "trainable.safetensors",
        )
        tensors, layout = _flatten_optimizer(optimizer_state)
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


class DamagedCheckpointError(InvalidInputError):
    """A checkpoint that cannot be this run's: unreadable, truncated, or of other names, shapes or dtypes."""


def load_checkpoint(path: Path, trainable: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG in place; returns the saved progress (`step`, ...).

    Everything is read and checked before anything is restored, so a damaged checkpoint changes nothing: a
    tensor cut to `[:1]` would otherwise be broadcast by `copy_` into every row.
    """
    try:
        saved = load_file(path / "trainable.safetensors")
        optimizer_tensors = load_file(path / "optimizer.safetensors")
        layout, progress = read_json(path / "optimizer.json"), read_json(path / "progress.json")
        rng = load_file(path / "rng.safetensors")
        state = _unflatten_optimizer(optimizer_tensors, layout)
    except (SafetensorError, OSError, InvalidInputError, KeyError, TypeError, ValueError) as error:
        raise DamagedCheckpointError(f"{path.name} cannot be read ({first_line(error)})") from error
    _check_weights(path, saved, trainable)
    if [len(g["params"]) for g in state["param_groups"]] != [len(g["params"]) for g in optimizer.param_groups]:
        raise DamagedCheckpointError(f"{path.name}: the optimizer's parameter groups differ from this run's")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for index, moments in state["state"].items():
        for key, value in moments.items():
            if (
                torch.is_tensor(value)
                and value.dim()
                and (index >= len(parameters) or value.shape != parameters[index].shape)
            ):
                raise DamagedCheckpointError(f"{path.name}: optimizer state {index}.{key} does not fit this run")
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int) or "cpu" not in rng:
        raise DamagedCheckpointError(f"{path.name}: progress.json or rng.safetensors is incomplete")
    _copy_into(trainable, saved)
    for index, moments in state["state"].items():  # each rank's shard of a sharded parameter's moments
        state["state"][index] = {
            key: placed_like(value, parameters[index]) if torch.is_tensor(value) and value.dim() else value
            for key, value in moments.items()
        }
    optimizer.load_state_dict(state)
    _set_rng_state(rng)
    return progress


def _check_weights(path: Path, saved: dict[str, torch.Tensor], trainable: Mapping[str, torch.Tensor]) -> None:
    if set(saved) != set(trainable):
        raise DamagedCheckpointError(f"{path.name} holds other trainable tensors than this run")
    for name, tensor in trainable.items():
        if saved[name].shape != tensor.shape or saved[name].dtype != tensor.dtype:
            raise DamagedCheckpointError(
                f"{path.name}: {name} is {tuple(saved[name].shape)} {saved[name].dtype}, "
                f"this run trains {tuple(tensor.shape)} {tensor.dtype}"
            )


def save_best(path: Path, trainable: dict[str, torch.Tensor], best: dict) -> None:
    """Keep the trainable tensors of the best step so far (`best`: its `step` and `eval_loss`), atomically."""
    with atomic_directory(path, overwrite=True) as staging:
        save_file({name: t.detach().contiguous() for name, t in trainable.items()}, staging / "trainable.safetensors")
        write_json_atomic(staging / "best.json", best)


def load_best(path: Path, trainable: Mapping[str, torch.Tensor], best: dict) -> None:
    """Put the best step's tensors back into the trainable parameters; refused unless they are that step's."""
    try:
        saved, recorded = load_file(path / "trainable.safetensors"), read_json(path / "best.json")
    except (SafetensorError, OSError, InvalidInputError) as error:
        raise DamagedCheckpointError(f"{path.name} cannot be read ({first_line(error)})") from error
    if recorded != best:
        raise DamagedCheckpointError(f"{path.name} holds step {recorded.get('step')}, not the best step {best['step']}")
    _check_weights(path, saved, trainable)
    _copy_into(trainable, saved)


@torch.no_grad()
def _copy_into(trainable: Mapping[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    for name, tensor in trainable.items():
        tensor.copy_(placed_like(saved[name], tensor))


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
    groups = [
        dict(group, betas=tuple(group["betas"])) if "betas" in group else group for group in layout["param_groups"]
    ]
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
