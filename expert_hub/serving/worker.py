"""Task loading inside vLLM's worker process (a `--worker-extension-cls`, called through `collective_rpc`).

Loading a task copies its experts into free bank rows, converted to the expert kernel's weight layout, then
publishes its remap row; unloading frees them. The front end decides what to load and when (see `tasks.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from expert_hub.adapter import ExpertAdapter
from expert_hub.errors import ExpertHubError
from expert_hub.families import PROJECTIONS, expert_checkpoint_key
from expert_hub.models import checkpoint_tensors

from . import bank

_EXPERT_TENSORS = tuple(f"{projection}.weight" for projection in PROJECTIONS)
# vLLM passes only an exception's message across processes: these prefixes tell the front end what happened.
BANK_FULL = "expert bank full"
ADAPTER_REFUSED = "adapter refused"


class BankFullError(RuntimeError):
    """Not enough free expert rows in some layer; the front end evicts an idle task and retries."""

    def __init__(self, message: str):
        super().__init__(f"{BANK_FULL}: {message}")


class AdapterRefusedError(ValueError):
    """The adapter's files cannot be served (changed on disk since the front end checked them): never retried."""

    def __init__(self, message: str):
        super().__init__(f"{ADAPTER_REFUSED}: {message}")


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
        row vLLM loaded. A backend whose kernel layout `_kernel_row` does not reproduce (FlashInfer's swapped halves,
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
    def expert_hub_load_task(self, key: str, directory: str) -> int:
        """Write the adapter's experts into free rows and publish its remap row under `key`; returns that row.

        All or nothing: the adapter is read, checked (finite weights, experts the served model has, shapes) and
        converted to the kernel layout before the bank is touched, and a failure while writing gives every row back.
        """
        if key in bank.TASK_ROWS:
            return bank.TASK_ROWS[key]
        layers = _banked_layers(self.model_runner.model)
        try:
            adapter = ExpertAdapter.load(directory)  # refuses non-finite and non-float weights
            rows = {index: [(expert, *_kernel_row(layers[index], _expert_tensors(adapter, index, expert)))
                            for expert in experts]
                    for index, experts in _checked_experts(adapter, layers).items()}
        except (ExpertHubError, ValueError, OSError) as error:
            raise AdapterRefusedError(str(error)) from None
        for index, experts in rows.items():
            if len(experts) > len(layers[index].free_rows):
                raise BankFullError(f"the task needs {len(experts)} expert rows in layer {index}; "
                                    f"{len(layers[index].free_rows)} are free")
        used = set(bank.TASK_ROWS.values())
        max_row = next(iter(layers.values())).task_remap.shape[0] - 1
        row = next((r for r in range(1, max_row + 1) if r not in used), None)
        if row is None:
            raise BankFullError(f"all {max_row} task slots are in use")
        try:
            for index, experts in rows.items():
                layer = layers[index]
                layer.task_rows[row] = [layer.free_rows.pop(0) for _ in experts]
                for (expert, w13, w2), target in zip(experts, layer.task_rows[row]):
                    layer.w13_weight[target].copy_(w13)
                    layer.w2_weight[target].copy_(w2)
                    layer.task_remap[row, expert] = target
        except BaseException:
            _release_row(layers.values(), row)
            raise
        bank.TASK_ROWS[key] = row  # published last: tokens are tagged with the row only from now on
        return row

    @torch.no_grad()
    def expert_hub_unload_task(self, key: str) -> bool:
        row = bank.TASK_ROWS.pop(key, None)  # untagged first, so no new token uses the rows being freed
        if row is None:
            return False
        _release_row(_banked_layers(self.model_runner.model).values(), row)
        return True


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
            layer.w13_weight[physical].zero_()
            layer.w2_weight[physical].zero_()
            layer.free_rows.append(physical)


def check_row_layout(layer, row: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write `expert`'s checkpoint tensors into the free `row` and require it to equal the loaded `expert` row."""
    try:
        w13, w2 = _kernel_row(layer, tensors)
        layer.w13_weight[row].copy_(w13)
        layer.w2_weight[row].copy_(w2)
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


def _kernel_row(layer, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert (checkpoint layout) as the `w13` and `w2` rows the layer's expert kernel expects."""
    gate, up, down = (tensors[name] for name in _EXPERT_TENSORS)
    intermediate, hidden = layer.expert_sizes
    if not gate.shape == up.shape == (intermediate, hidden) or down.shape != (hidden, intermediate):
        raise ValueError(f"expert shapes {tuple(gate.shape)} / {tuple(up.shape)} / {tuple(down.shape)} do not fit "
                         f"the served model's gate / up {(intermediate, hidden)} and down {(hidden, intermediate)}")
    kernel = layer.quant_method.moe_kernel.fused_experts
    dtype, padded_hidden, padded = layer.w13_weight.dtype, layer.w2_weight.shape[1], layer.w2_weight.shape[2]
    w13 = torch.zeros(1, 2 * padded, padded_hidden, dtype=dtype)  # vLLM rounds both sizes up for some kernels
    w13[0, :intermediate, :hidden], w13[0, padded : padded + intermediate, :hidden] = gate, up
    w2 = torch.zeros(1, padded_hidden, padded, dtype=dtype)
    w2[0, :hidden, :intermediate] = down
    if hasattr(kernel, "isa"):  # the CPU kernel prepacks each expert; a one-expert slice packs identically
        from vllm._custom_ops import cpu_prepack_moe_weight

        w13, w2 = cpu_prepack_moe_weight(w13, kernel.isa), cpu_prepack_moe_weight(w2, kernel.isa)
    if w13.shape[1:] != layer.w13_weight.shape[1:] or w2.shape[1:] != layer.w2_weight.shape[1:]:
        raise ValueError(f"expert shapes {tuple(w13.shape[1:])} / {tuple(w2.shape[1:])} do not match the served "
                         f"model's {tuple(layer.w13_weight.shape[1:])} / {tuple(layer.w2_weight.shape[1:])}")
    device = layer.w13_weight.device
    return w13[0].to(device), w2[0].to(device)
