"""Task loading inside vLLM's worker process (a `--worker-extension-cls`, called through `collective_rpc`).

Loading a task copies its experts into free bank rows, converted to the expert kernel's weight layout, then
publishes its remap row; unloading frees them. The front end decides what to load and when (see `tasks.py`) and
calls these methods through `bank_client.BankClient`. Expected outcomes (loaded, bank full, adapter refused; the
layout check's verdict) come back as plain-data results, which cross the process boundary as they are; only
unexpected failures raise. vLLM's objects are reached through `vllm_contract`.

Under tensor parallelism each rank runs every call on its own shard of the experts (`_shard`); the same calls
in the same order leave every rank with the same rows, and the front end checks that their replies agree.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypedDict

import torch

from expert_hub.adapter import ExpertAdapter
from expert_hub.errors import ExpertHubError
from expert_hub.families import PROJECTIONS, expert_checkpoint_key
from expert_hub.models import checkpoint_tensors

from . import bank
from . import vllm_contract as vllm

_EXPERT_TENSORS = tuple(f"{projection}.weight" for projection in PROJECTIONS)


@dataclass(frozen=True)
class LoadResult:
    """What loading a task did. `bank_full`: not enough free rows or task slots (the front end evicts an idle task
    and retries); `refused`: the adapter's files cannot be served (changed on disk since the front end checked
    them), never retried."""

    status: Literal["loaded", "bank_full", "refused"]
    row: int | None = None  # the task's remap row, when loaded
    message: str = ""


@dataclass(frozen=True)
class LayoutResult:
    """The start-up layout check: `no_reference` when the checkpoint has no per-expert tensors to compare with."""

    status: Literal["ok", "no_reference", "wrong_layout"]
    message: str = ""


class BankInfo(TypedDict):
    layers: int
    rows_per_layer: int
    free_rows_per_layer: int
    bytes: int
    bytes_per_row: int  # one row in every layer


class ExpertBankWorker:
    """Mixed into vLLM's worker class. Results are returned as dicts (`asdict`): vLLM sends them to the front end
    as msgpack."""

    def expert_hub_bank_info(self) -> BankInfo:
        layers = _banked_layers(vllm.served_model(self)).values()
        return BankInfo(
            layers=len(layers),
            rows_per_layer=min(map(_extra_rows, layers)),
            free_rows_per_layer=min(len(layer.free_rows) for layer in layers),
            bytes=sum(_row_bytes(layer) * _extra_rows(layer) for layer in layers),
            bytes_per_row=sum(map(_row_bytes, layers)),
        )

    @torch.no_grad()
    def expert_hub_check_layout(self) -> dict:
        """Write one base expert from the checkpoint into a spare row as tasks are written, and compare it with the
        row vLLM loaded. A backend whose kernel layout `vllm_contract.write_kernel_row` does not reproduce (FlashInfer's
        swapped halves, quantized weights) then fails at start-up instead of serving wrong
        tokens. Each tensor-parallel rank checks its own shard. A `LayoutResult`."""
        index, layer = min(_banked_layers(vllm.served_model(self)).items())
        keys = {name: expert_checkpoint_key(index, 0, name) for name in _EXPERT_TENSORS}
        directory = _local_checkpoint(*vllm.served_checkpoint(self))
        found = checkpoint_tensors(directory, set(keys.values())) if directory else {}
        if len(found) != len(keys) or not layer.free_rows:
            return asdict(LayoutResult("no_reference"))
        return asdict(check_row_layout(layer, layer.free_rows[0], 0, {name: found[key] for name, key in keys.items()}))

    @torch.no_grad()
    def expert_hub_load_task(self, key: str, directory: str, sha256: dict[str, str] | None = None) -> dict:
        """Write the adapter's experts into free rows and publish its remap row under `key`. A `LoadResult`.

        All or nothing: the adapter is read (once: a registry task's files are hashed from the same bytes, against
        `sha256`) and checked (finite weights, experts the served model has, shapes) before the bank is touched;
        each expert is then converted to the kernel layout straight into its row, and a failure while writing gives
        every row back (and raises).
        """
        if key in bank.TASK_ROWS:
            return asdict(LoadResult("loaded", bank.TASK_ROWS[key]))
        layers = _banked_layers(vllm.served_model(self))
        try:
            adapter = _read_adapter(directory, sha256)  # refuses changed files and non-finite weights
            rows = {
                index: [(expert, _shard(layers[index], _expert_tensors(adapter, index, expert))) for expert in experts]
                for index, experts in _checked_experts(adapter, layers).items()
            }
        except (ExpertHubError, ValueError, OSError) as error:
            return asdict(LoadResult("refused", message=str(error)))
        for index, experts in rows.items():
            if len(experts) > len(layers[index].free_rows):
                return asdict(
                    LoadResult(
                        "bank_full",
                        message=f"the task needs {len(experts)} expert rows in layer "
                        f"{index}; {len(layers[index].free_rows)} are free",
                    )
                )
        used = set(bank.TASK_ROWS.values())
        max_row = next(iter(layers.values())).task_remap.shape[0] - 1
        row = next((r for r in range(1, max_row + 1) if r not in used), None)
        if row is None:
            return asdict(LoadResult("bank_full", message=f"all {max_row} task slots are in use"))
        try:
            for index, experts in rows.items():
                layer = layers[index]
                layer.task_rows[row] = [layer.free_rows.pop(0) for _ in experts]
                for (expert, weights), target in zip(experts, layer.task_rows[row]):
                    vllm.write_kernel_row(layer, target, *weights)
                    layer.task_remap[row, expert] = target
        except BaseException:
            _release_row(layers.values(), row)
            raise
        bank.TASK_ROWS[key] = row  # published last: tokens are tagged with the row only from now on
        return asdict(LoadResult("loaded", row))

    @torch.no_grad()
    def expert_hub_unload_task(self, key: str) -> bool:
        row = bank.TASK_ROWS.pop(key, None)  # untagged first, so no new token uses the rows being freed
        if row is None:
            return False
        _release_row(_banked_layers(vllm.served_model(self)).values(), row)
        return True


def _read_adapter(directory: str, sha256: dict[str, str] | None) -> ExpertAdapter:
    """`ExpertAdapter.load` on every core the server has, not only the worker's compute cores.

    vLLM binds the CPU worker's threads, and so the threads they start, to the cores it computes on: one of the two
    on a 2-core machine, where reading a task's files and hashing them would then take turns on one core. Model
    steps wait for a load anyway (the worker runs one call at a time), so the load's threads may also use the cores
    vLLM keeps for its scheduler and API server. Measured on 2 cores, a 144 MiB task is read, hashed and checked in
    about 93 ms instead of 160.
    """
    if (cores := vllm.server_cores()) is None:
        return ExpertAdapter.load(directory, sha256)
    with ThreadPoolExecutor(1, initializer=os.sched_setaffinity, initargs=(0, cores)) as loader:
        return loader.submit(ExpertAdapter.load, directory, sha256).result()


def _checked_experts(adapter: ExpertAdapter, layers: dict[int, torch.nn.Module]) -> dict[int, list[int]]:
    """The adapter's experts per layer, refused unless the served model has every one of them."""
    for index, experts in adapter.selection.experts.items():
        if index not in layers:
            raise ValueError(f"layer {index} is not an MoE layer of the served model")
        if bad := [expert for expert in experts if not 0 <= expert < layers[index].base_experts]:
            raise ValueError(f"layer {index} has {layers[index].base_experts} experts; the task names expert {bad[0]}")
    return adapter.selection.experts


def _expert_tensors(adapter: ExpertAdapter, layer: int, expert: int) -> dict[str, torch.Tensor]:
    return {name: adapter.tensors[expert_checkpoint_key(layer, expert, name)] for name in _EXPERT_TENSORS}


def _release_row(layers, row: int) -> None:
    """Give a remap row's physical rows back, zeroed, and point the row at the base experts again."""
    for layer in layers:
        layer.task_remap[row] = torch.arange(layer.base_experts, dtype=layer.task_remap.dtype)
        for physical in layer.task_rows.pop(row, []):
            for weight in vllm.expert_weights(layer):
                weight[physical].zero_()
            layer.free_rows.append(physical)


def check_row_layout(layer, row: int, expert: int, tensors: dict[str, torch.Tensor]) -> LayoutResult:
    """Write `expert`'s checkpoint tensors into the free `row` and compare it with the loaded `expert` row."""
    weights = vllm.expert_weights(layer)
    try:
        vllm.write_kernel_row(layer, row, *_shard(layer, tensors))
        same = all(torch.equal(weight[row], weight[expert]) for weight in weights)
    finally:
        for weight in weights:
            weight[row].zero_()
    if same:
        return LayoutResult("ok")
    return LayoutResult(
        "wrong_layout",
        f"{vllm.expert_kernel_name(layer)} keeps expert weights in a layout the "
        "expert bank cannot write yet: a base expert written as tasks are did not match the loaded "
        "one; serve merged checkpoints instead",
    )


def _local_checkpoint(model: str, revision: str | None) -> str | None:
    """The served checkpoint's local directory (a Hub model is in the cache by now: vLLM has loaded it)."""
    if Path(model).is_dir():
        return model
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(model, revision=revision, local_files_only=True, allow_patterns=["*.safetensors"])
    except (LocalEntryNotFoundError, HFValidationError):  # elsewhere (a --download-dir): nothing to compare with
        return None


def _banked_layers(model) -> dict[int, torch.nn.Module]:
    """Layer index -> the banked experts module of that MoE layer."""
    layers = {}
    for module_name, module in model.named_modules():
        if getattr(module, "expert_hub_bank", False):
            layers[int(module_name.split("layers.")[1].split(".")[0])] = module
    if not layers:
        raise RuntimeError("the served model has no expert bank: was it started by `expert-hub serve`?")
    return layers


def _row_bytes(layer) -> int:
    return sum(weight[0].nbytes for weight in vllm.expert_weights(layer))


def _extra_rows(layer) -> int:
    return vllm.expert_weights(layer)[0].shape[0] - layer.base_experts


def _shard(layer, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's gate, up and down (checkpoint layout) as this rank holds them: under tensor parallelism its
    slice of the intermediate dimension, cut as vLLM's weight loader cuts the base experts."""
    gate, up, down = (tensors[name] for name in _EXPERT_TENSORS)
    intermediate, hidden = layer.expert_sizes
    shard, shards = layer.expert_shard
    full = intermediate * shards
    if not gate.shape == up.shape == (full, hidden) or down.shape != (hidden, full):
        raise ValueError(
            f"expert shapes {tuple(gate.shape)} / {tuple(up.shape)} / {tuple(down.shape)} do not fit "
            f"the served model's gate / up {(full, hidden)} and down {(hidden, full)}"
        )
    part = slice(shard * intermediate, (shard + 1) * intermediate)
    return gate[part], up[part], down[:, part]
