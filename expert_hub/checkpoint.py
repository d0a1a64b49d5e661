"""A base model's checkpoint on disk: which safetensors file holds each tensor, and where a model tensor lies in it.

Adapters name what they replace by model key: a per-expert key (`model.layers.3.mlp.experts.5.gate_proj.weight`)
or a parameter name. A checkpoint may spell those differently (Mixtral's `block_sparse_moe.experts.5.w1.weight`) or
store a layer's experts fused (gpt_oss' `experts.gate_up_proj`, all experts in one tensor). `BaseCheckpoint.place`
finds each model key in the checkpoint's own layout, so the base's experts can be read (the fingerprint an adapter
checks) and rewritten (`expert-hub merge`) without loading the model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .adapter import LazyTensors, fingerprint_tensors, selected_views
from .errors import AdapterMismatchError, InvalidInputError
from .families import FUSED_TENSOR, expert_view_in, family_of, moe_layers, parse_expert_key
from .io import read_json
from .models import meta_model
from .selection import ExpertSelection

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Place:
    """Where a model tensor lies in a checkpoint: all of tensor `key`, or, for experts stored fused, the view of
    expert `expert`'s `tensor` inside it."""

    key: str
    expert: int | None = None
    tensor: str | None = None


class BaseCheckpoint:
    """A local checkpoint directory's safetensors weights, read a tensor at a time through their headers."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise InvalidInputError(f"{self.directory} is not a model directory: it has no config.json")
        self.config = read_json(self.directory / "config.json")
        if not isinstance(self.config, dict):
            raise InvalidInputError(f"{self.directory / 'config.json'} is not a model config")
        if quantization := self.config.get("quantization_config"):
            method = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
            raise InvalidInputError(
                f"{self.directory} stores its weights quantized ({method}); expert-hub rewrites unquantized weights "
                "only: give the unquantized (e.g. bfloat16) release of the base"
            )
        self.family = family_of(_ModelType(self.config.get("model_type")))
        self.shard_of = self._read_headers()
        self.files = sorted(set(self.shard_of.values()))

    def _read_headers(self) -> dict[str, Path]:
        """Every tensor key -> its file, from the files' headers (the index, when there is one, only lists them)."""
        index = self.directory / INDEX_FILE
        if index.is_file():
            content = read_json(index)
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
            names: set[Any] = set(weight_map.values()) if isinstance(weight_map, dict) else {None}
            if not all(
                isinstance(name, str) and name == Path(name).name and name.endswith(".safetensors") for name in names
            ):
                raise InvalidInputError(f"{index} is not a safetensors index: its weight_map must name files beside it")
            files = sorted(self.directory / name for name in names)
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise InvalidInputError(
                f"{self.directory} has no safetensors weights (expert-hub never reads pickled .bin checkpoints)"
            )
        shard_of: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(file, "pt") as handle:
                    shard_of |= dict.fromkeys(handle.keys(), file)
            except (SafetensorError, OSError) as error:
                raise InvalidInputError(f"cannot read {file}: {error}") from error
        return shard_of

    @cached_property
    def model(self) -> torch.nn.Module:
        """The model on the meta device: its layers' prefixes and the fused experts' layout."""
        return meta_model(str(self.directory))

    @cached_property
    def _experts_by_prefix(self) -> dict[str, torch.nn.Module]:
        return {layer.prefix: layer.experts for layer in moe_layers(self.model)}

    def place(self, model_key: str) -> Place:
        """Where `model_key` lies: under the family's checkpoint name, or inside a fused experts tensor."""
        if (spelled := self.family.checkpoint_key(model_key)) in self.shard_of:
            return Place(spelled)
        if model_key in self.shard_of:
            return Place(model_key)
        parsed = parse_expert_key(model_key)
        if parsed is not None and parsed.tensor in FUSED_TENSOR:
            fused = f"{parsed.prefix}.experts.{FUSED_TENSOR[parsed.tensor]}"
            if fused in self.shard_of and parsed.prefix in self._experts_by_prefix:
                return Place(fused, parsed.expert, parsed.tensor)
        raise AdapterMismatchError(
            f"{self.directory} holds no {spelled} (nor a fused experts tensor holding it): not this family's "
            "checkpoint layout, or not the adapter's base"
        )

    def view(self, place: Place, stored: torch.Tensor) -> torch.Tensor:
        """The model tensor inside `stored`, the checkpoint tensor `place.key` (a view: writing it writes `stored`).

        For a fused place `stored` may be the whole tensor or just the expert's slab (`stored[expert:expert + 1]`).
        """
        if place.expert is None:
            return stored
        experts = self._experts_by_prefix[place.key.rsplit(".experts.", 1)[0]]
        expert = place.expert if stored.shape[0] > 1 else 0
        assert place.tensor is not None  # a place inside fused experts names its tensor
        return expert_view_in(experts, stored, expert, place.tensor)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """A function that reads one model tensor, only its bytes (an expert's slab of a fused tensor, not the whole
        layer). Each file is opened once, at its first read: opening one parses its whole header (0.9 ms for the
        serving benchmark base's 1,612 tensors), and a handle per matrix made a task's base check 142 ms instead of
        24 ms, on the API server's core. Files are closed on exit, and what they mapped is unmapped with them (a
        server checks tasks for as long as it runs)."""
        with contextlib.ExitStack() as files:
            handles: dict[Path, Any] = {}

            def read(model_key: str) -> torch.Tensor:
                place = self.place(model_key)
                file = self.shard_of[place.key]
                if (handle := handles.get(file)) is None:
                    handle = handles[file] = files.enter_context(safe_open(file, "pt"))
                if place.expert is None:
                    return handle.get_tensor(place.key)
                return self.view(place, handle.get_slice(place.key)[place.expert : place.expert + 1])

            yield read

    def selected_keys(self, selection: ExpertSelection) -> list[str]:
        """The model keys an adapter of `selection` replaces, as `ExpertAdapter.from_model` names them."""
        return sorted(selected_views(self.model, selection))

    def fingerprint(self, selection: ExpertSelection) -> str:
        """The base fingerprint an adapter of `selection` trained from this checkpoint records."""
        with self.reader() as read:
            return fingerprint_tensors(LazyTensors(self.selected_keys(selection), read))


def checkpoint_fingerprint(base: str, selection: ExpertSelection) -> str | None:
    """The fingerprint of `selection`'s experts read straight from a local base checkpoint's files.

    Used where the base is never loaded through transformers (serving on vLLM, merging). None when the base is not a
    local directory or its checkpoint does not hold those experts in a layout expert-hub knows.
    """
    if not Path(base).is_dir():
        return None
    with contextlib.suppress(InvalidInputError, AdapterMismatchError):
        return _opened(str(Path(base).resolve())).fingerprint(selection)
    return None


@functools.lru_cache(maxsize=4)
def _opened(directory: str) -> BaseCheckpoint:
    """A server checks each task against the same base: its headers are read, and its meta model built, once."""
    return BaseCheckpoint(directory)


@dataclass(frozen=True)
class _ModelType:
    """What `family_of` reads from a config, for a config still in JSON."""

    model_type: str | None
