"""Task loading inside vLLM's worker process (a `--worker-extension-cls`, called through `collective_rpc`).

Loading a task copies its experts into free bank rows, converted to the expert kernel's weight layout, then
publishes its remap row; unloading frees them. The front end decides what to load and when (see `tasks.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from expert_hub.adapter import ExpertAdapter, checkpoint_tensors, expert_checkpoint_key
from expert_hub.families import PROJECTIONS

from . import bank

_EXPERT_TENSORS = tuple(f"{projection}.weight" for projection in PROJECTIONS)
BANK_FULL = "expert bank full"


class BankFullError(RuntimeError):
    """Not enough free expert rows in some layer; the front end evicts an idle task and retries.

    vLLM passes only the message across processes, so it starts with `BANK_FULL` for the front end to recognise."""

    def __init__(self, message: str):
        super().__init__(f"{BANK_FULL}: {message}")


class ExpertBankWorker:
    """Mixed into vLLM's worker class; `self.model_runner.model` is the served model."""

    def expert_hub_bank_info(self) -> dict:
        layers = _banked_layers(self.model_runner.model).values()
        rows = min(layer.w13_weight.shape[0] - layer.base_experts for layer in layers)
        return {
            "layers": len(layers),
            "rows_per_layer": rows,
            "free_rows_per_layer": min(len(layer.free_rows) for layer in layers),
            "bytes": sum(_row_bytes(layer) * (layer.w13_weight.shape[0] - layer.base_experts) for layer in layers),
            "bytes_per_row": sum(map(_row_bytes, layers)),  # one row in every layer
        }

    @torch.no_grad()
    def expert_hub_check_layout(self) -> bool:
        """Write one base expert from the checkpoint into a spare row as tasks are written, and compare it with the
        row vLLM loaded. A backend whose kernel layout `_write_row` does not reproduce (FlashInfer's swapped halves,
        quantized weights, tensor-parallel shards) then fails at start-up instead of serving wrong tokens.
        False when the checkpoint has no per-expert tensors to compare with."""
        index, layer = min(_banked_layers(self.model_runner.model).items())
        keys = {name: expert_checkpoint_key(index, 0, name) for name in _EXPERT_TENSORS}
        directory = _local_checkpoint(self.model_runner.model_config)
        found = checkpoint_tensors(directory, set(keys.values())) if directory else {}
        if len(found) != len(keys) or not layer.free_rows:
            return False
        check_row_layout(layer, layer.free_rows[0], 0, {name: found[key] for name, key in keys.items()})
        return True

    @torch.no_grad()
    def expert_hub_load_task(self, name: str, directory: str) -> int:
        """Write the adapter's experts into free rows and publish its remap row; returns that row."""
        if name in bank.TASK_ROWS:
            return bank.TASK_ROWS[name]
        adapter = ExpertAdapter.load(directory)
        layers = _banked_layers(self.model_runner.model)
        needed = {index: len(experts) for index, experts in adapter.selection.experts.items()}
        for index, count in needed.items():
            if index not in layers:
                raise ValueError(f"task {name}: layer {index} is not an MoE layer of the served model")
            if count > len(layers[index].free_rows):
                raise BankFullError(f"task {name} needs {count} expert rows in layer {index}; "
                                    f"{len(layers[index].free_rows)} are free")
        used = set(bank.TASK_ROWS.values())
        max_row = next(iter(layers.values())).task_remap.shape[0] - 1
        row = next((r for r in range(1, max_row + 1) if r not in used), None)
        if row is None:
            raise BankFullError(f"all {max_row} task slots are in use")
        for index, experts in adapter.selection.experts.items():
            layer = layers[index]
            physical = [layer.free_rows.pop(0) for _ in experts]
            for expert, target in zip(experts, physical):
                tensors = {name_: adapter.tensors[expert_checkpoint_key(index, expert, name_)]
                           for name_ in _EXPERT_TENSORS}
                _write_row(layer, target, tensors)
                layer.task_remap[row, expert] = target
            layer.task_rows[row] = physical
        bank.TASK_ROWS[name] = row  # published last: tokens are tagged with the row only from now on
        return row

    def expert_hub_unload_task(self, name: str) -> bool:
        row = bank.TASK_ROWS.pop(name, None)  # untagged first, so no new token uses the rows being freed
        if row is None:
            return False
        for layer in _banked_layers(self.model_runner.model).values():
            layer.task_remap[row] = torch.arange(layer.base_experts, dtype=layer.task_remap.dtype)
            layer.free_rows.extend(layer.task_rows.pop(row, []))
        return True


def check_row_layout(layer, row: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write `expert`'s checkpoint tensors into the free `row` and require it to equal the loaded `expert` row."""
    try:
        _write_row(layer, row, tensors)
        same = torch.equal(layer.w13_weight[row], layer.w13_weight[expert]) and \
            torch.equal(layer.w2_weight[row], layer.w2_weight[expert])
    finally:
        layer.w13_weight[row].zero_()
        layer.w2_weight[row].zero_()
    if not same:
        raise RuntimeError(f"{type(layer.quant_method.moe_kernel.fused_experts).__name__} keeps expert weights in a "
                           "layout the expert bank cannot write yet: a base expert written as tasks are did not "
                           "match the loaded one; serve merged checkpoints instead")


def _local_checkpoint(model_config) -> str | None:
    """The served checkpoint's local directory (a Hub model is in the cache by now: vLLM has loaded it)."""
    if Path(model_config.model).is_dir():
        return model_config.model
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(model_config.model, revision=model_config.revision, local_files_only=True,
                                 allow_patterns=["*.safetensors"])
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
    return layer.w13_weight[0].nbytes + layer.w2_weight[0].nbytes


def _write_row(layer, row: int, tensors: dict[str, torch.Tensor]) -> None:
    """Copy one expert (checkpoint layout) into a physical row, in the layout the expert kernel expects."""
    gate, up, down = (tensors[name] for name in _EXPERT_TENSORS)
    kernel = layer.quant_method.moe_kernel.fused_experts
    dtype = layer.w13_weight.dtype
    intermediate, padded = gate.shape[0], layer.w2_weight.shape[2]
    w13 = torch.zeros(1, 2 * padded, gate.shape[1], dtype=dtype)
    w13[0, :intermediate], w13[0, padded : padded + intermediate] = gate, up  # the CPU kernel pads I
    w2 = torch.zeros(1, down.shape[0], padded, dtype=dtype)
    w2[0, :, :intermediate] = down
    if hasattr(kernel, "isa"):  # the CPU kernel prepacks each expert; a one-expert slice packs identically
        from vllm._custom_ops import cpu_prepack_moe_weight

        w13, w2 = cpu_prepack_moe_weight(w13, kernel.isa), cpu_prepack_moe_weight(w2, kernel.isa)
    if w13.shape[1:] != layer.w13_weight.shape[1:] or w2.shape[1:] != layer.w2_weight.shape[1:]:
        raise ValueError(f"expert shapes {tuple(w13.shape[1:])} / {tuple(w2.shape[1:])} do not match the served "
                         f"model's {tuple(layer.w13_weight.shape[1:])} / {tuple(layer.w2_weight.shape[1:])}")
    layer.w13_weight[row].copy_(w13[0].to(layer.w13_weight.device))
    layer.w2_weight[row].copy_(w2[0].to(layer.w2_weight.device))
