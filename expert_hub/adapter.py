"""`ExpertAdapter`: a task's experts as a directory that can be saved, shared and applied to a base model.

Layout of an adapter directory:
- `expert_cfg.json` — the selection, in the reference schema;
- `*.safetensors` — the experts' weights under per-expert checkpoint keys
  (`model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight`), plus shared-expert or non-expert tensors
  under their model keys when those were trained. The published `deepseek-ai/ESFT-*-lite` adapters use the
  same keys (some with a legacy `layers.` prefix), so they load as they are;
- `expert_hub.json` — metadata, including a fingerprint of the base weights the experts replace.

`expert_hub.load_model` (in `loading.py`) puts an adapter, given as a directory or a registry reference, into a
base model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import integrity
from .errors import AdapterMismatchError, InvalidInputError
from .families import (
    PROJECTIONS,
    canonical_key,
    expert_views,
    moe_layers,
    parse_expert_key,
    split_parameters,
)
from .io import atomic_directory, read_json, write_json_atomic
from .models import ModelSummary
from .selection import ExpertSelection

CONFIG_FILE = "expert_cfg.json"
WEIGHTS_FILE = "experts.safetensors"
METADATA_FILE = "expert_hub.json"

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
logger = logging.getLogger(__name__)


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("expert-hub", "torch", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


@dataclass
class AdapterMetadata:
    """Where the experts came from. Every field is optional: published adapters carry none of it."""

    task: str | None = None
    method: str | None = None
    score_function: str | None = None
    top_p: float | None = None
    base_model: str | None = None
    base_revision: str | None = None
    base_fingerprint: str | None = None
    created: str | None = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    versions: dict[str, str] = field(default_factory=_library_versions)
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # the training config, data, steps and time

    @classmethod
    def from_json(cls, data, origin: str = METADATA_FILE) -> AdapterMetadata:
        """Metadata as stored; fields it lacks stay empty rather than taking today's values.

        Each field is checked for its type, since the registry lists and publishes what an import or pull brings.
        """
        if not isinstance(data, dict):
            raise InvalidInputError(f"{origin} is not expert-hub adapter metadata")
        for name, value in data.items():
            if name in _METADATA_CHECKS and not _METADATA_CHECKS[name](value):
                raise InvalidInputError(f"{origin} is not expert-hub adapter metadata: {name} = {value!r:.80}")
        known = {f.name for f in fields(cls)}
        return cls(**({"created": None, "versions": {}} | {k: v for k, v in data.items() if k in known}))


def _is_number(value) -> bool:
    return type(value) in (int, float)  # not bool, although bool is an int


_METADATA_CHECKS = {
    **{
        name: lambda value: value is None or isinstance(value, str)
        for name in ("task", "method", "score_function", "base_model", "base_revision", "base_fingerprint", "created")
    },
    "top_p": lambda value: value is None or _is_number(value),
    "versions": lambda value: isinstance(value, dict),
    "training": lambda value: isinstance(value, dict),
    "metrics": lambda value: (
        isinstance(value, dict) and all(isinstance(k, str) and _is_number(v) for k, v in value.items())
    ),
}


@dataclass
class AdapterHeader:
    """An adapter directory's selection, metadata and tensor names, read without loading any weights.

    Reading it checks everything but the numbers: the files parse, no tensor is given twice, and the routed-expert
    tensors are exactly those of the selected experts.
    """

    selection: ExpertSelection
    metadata: AdapterMetadata
    shards: dict[str, Path]  # canonical tensor key -> the safetensors file holding it

    @classmethod
    def read(cls, directory: str | Path) -> AdapterHeader:
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise InvalidInputError(f"{directory} is not an expert adapter: it has no {CONFIG_FILE}")
        selection = ExpertSelection.load(directory / CONFIG_FILE)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise InvalidInputError(f"{directory} has no .safetensors weights")
        shards: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(file, "pt") as handle:
                    keys = list(handle.keys())
            except (SafetensorError, OSError) as error:
                raise InvalidInputError(f"cannot read {file}: {error}") from error
            for key in keys:
                if (canonical := canonical_key(key)) in shards:
                    raise InvalidInputError(f"{directory} holds {canonical} twice (in {file.name} as {key})")
                shards[canonical] = file
        metadata_path = directory / METADATA_FILE
        metadata = AdapterMetadata.from_json(
            read_json(metadata_path) if metadata_path.is_file() else {}, origin=str(metadata_path)
        )
        _check_tensors_match_selection(selection, shards, origin=str(directory))
        return cls(selection, metadata, shards)

    def check_fits(self, model: ModelSummary) -> None:
        """Every selected expert exists in `model` and every routed-expert tensor has its shape.

        Read from the safetensors headers alone, so a server can refuse an adapter before it touches anything
        (`check_values` then reads the numbers).
        """
        for layer, experts in sorted(self.selection.experts.items()):
            if layer not in model.moe_layers:
                raise AdapterMismatchError(
                    f"layer {layer} is not an MoE layer of the model (those are "
                    f"{model.moe_layers[0]}-{model.moe_layers[-1]})"
                )
            if bad := [expert for expert in experts if expert >= model.num_experts]:
                raise AdapterMismatchError(
                    f"the model has {model.num_experts} experts per layer; the adapter "
                    f"selects expert {bad[0]} of layer {layer}"
                )
        for file in sorted(set(self.shards.values())):
            with safe_open(file, "pt") as handle:
                for key in handle.keys():
                    parsed = parse_expert_key(canonical_key(key))
                    if parsed is None or (expected := model.expert_shapes.get(parsed.tensor)) is None:
                        raise AdapterMismatchError(f"{file.name}: {key} is not a routed-expert tensor of the model")
                    if (shape := tuple(handle.get_slice(key).get_shape())) != expected:
                        raise AdapterMismatchError(
                            f"{file.name}: {key} has shape {shape}; the model's {parsed.tensor} is {expected}"
                        )

    def check_values(self) -> None:
        """Every tensor is a finite floating-point weight.

        Read tensor by tensor, memory-mapped, each through its own handle: a handle keeps every page it has mapped
        until it closes, so one handle for the file would hold the whole adapter (which may outgrow a base shard).
        """
        for key, file in sorted(self.shards.items()):
            with safe_open(file, "pt") as handle:
                stored = stored_key(handle, key)
                check_weight(stored, handle.get_tensor(stored), origin=file.name)


def stored_key(handle, canonical: str) -> str:
    """The key an adapter file stores `canonical` under: published ESFT adapters sometimes drop the `model.`."""
    return canonical if canonical in handle.keys() else canonical.removeprefix("model.")


def check_weight(key: str, tensor: torch.Tensor, origin: str) -> None:
    """Refuse a tensor that is not a finite floating-point weight.

    One NaN or infinite weight makes every token routed through it NaN, and whatever those tokens write (KV blocks)
    outlives the request, so such adapters never get in: not at import, not at load. The test reads min and max,
    which NaN propagates to: one reduction pass with no temporary, where `isfinite(tensor).all()` first writes a
    boolean tensor as large as the weight and then reads it again (the figure: docs/benchmarks.md, History).
    """
    check_dtype(key, tensor, origin)
    if tensor.numel() and not all(torch.isfinite(bound) for bound in torch.aminmax(tensor)):
        raise InvalidInputError(f"{origin}: {key} holds NaN or infinite values (did training diverge?)")


def check_dtype(key: str, tensor: torch.Tensor, origin: str) -> None:
    if tensor.dtype not in _WEIGHT_DTYPES:
        raise InvalidInputError(
            f"{origin}: {key} is {str(tensor.dtype).removeprefix('torch.')}, not a floating-point weight"
        )


def _tensors_in(buffer: torch.Tensor, origin: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buffer`, as views of it: the bytes just hashed, not a copy.

    safetensors can only deserialize bytes by copying them, so its layout (an 8-byte header length, a JSON header of
    dtype, shape and data offsets, then the data) is read here; the file's header has already been parsed and
    checked by safetensors itself (`AdapterHeader.read`).
    """
    raw = buffer.numpy()
    header_length = int.from_bytes(raw[:8].tobytes(), "little")
    header = json.loads(raw[8 : 8 + header_length].tobytes())
    data = buffer[8 + header_length :]
    tensors = {}
    for key, record in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(record["dtype"])
        if dtype is None:
            raise InvalidInputError(f"{origin}: {key} is {record['dtype']}, not a floating-point weight")
        begin, end = record["data_offsets"]
        if not 0 <= begin <= end <= data.numel() or end - begin != math.prod(record["shape"]) * dtype.itemsize:
            raise InvalidInputError(f"{origin}: {key} does not fit the file")
        tensor_bytes = data[begin:end]
        if begin % dtype.itemsize:  # never in files safetensors writes; a copy realigns it
            tensor_bytes = tensor_bytes.clone()
        tensors[key] = tensor_bytes.view(dtype).reshape(record["shape"])
    return tensors


def _check_tensors_match_selection(selection: ExpertSelection, keys, origin: str) -> None:
    """The routed-expert tensors are exactly those of the selected experts, and nothing else is there unasked.

    A shared-expert or other non-expert tensor is applied to the base like the experts, so one that the selection
    does not train (`shared_experts` / `non_expert_modules` false) is refused rather than silently applied.
    """
    held: dict[tuple[int, int], set[str]] = {}
    for key in keys:
        if (parsed := parse_expert_key(key)) and parsed.layer is not None:
            held.setdefault((parsed.layer, parsed.expert), set()).add(parsed.tensor)
        elif not parsed:
            flag = "shared_experts" if "shared_expert" in key else "non_expert_modules"
            if not getattr(selection, flag):
                raise InvalidInputError(f"{origin} holds {key}, which {CONFIG_FILE} does not train ({flag} is false)")
    selected = set(selection.pairs)
    if extra := sorted(set(held) - selected):
        raise InvalidInputError(f"{origin} holds weights for experts {CONFIG_FILE} does not select: {extra[:5]}")
    for pair in sorted(selected):
        if {name.split(".")[0] for name in held.get(pair, ())} != set(PROJECTIONS):
            raise InvalidInputError(f"{origin} lacks weights for selected expert {pair[1]} of layer {pair[0]}")


@dataclass
class ExpertAdapter:
    """A selection, the tensors it replaces in the base model (by checkpoint key), and metadata."""

    selection: ExpertSelection
    tensors: dict[str, torch.Tensor]
    metadata: AdapterMetadata = field(default_factory=AdapterMetadata)

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors.values())

    @classmethod
    def from_model(
        cls, model: nn.Module, selection: ExpertSelection, base_fingerprint: str | None = None, **metadata
    ) -> ExpertAdapter:
        """Take the selected experts (and shared / non-expert tensors, when selected) out of `model`.

        `base_fingerprint` is `fingerprint_selection(base, selection)` taken before training; without it
        `model` itself is taken to be the base.
        """
        views = selected_views(model, selection)
        tensors = {key: view.detach().contiguous().clone() for key, view in views.items()}
        metadata.setdefault("base_model", getattr(model.config, "_name_or_path", None) or None)
        metadata.setdefault("base_revision", getattr(model.config, "_commit_hash", None))
        fingerprint = base_fingerprint or fingerprint_tensors(views)
        return cls(selection, tensors, AdapterMetadata(base_fingerprint=fingerprint, **metadata))

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the adapter atomically: readers see no directory or a complete one."""
        for key, tensor in self.tensors.items():
            check_weight(key, tensor, origin="the adapter")
        with atomic_directory(directory, overwrite) as staging:
            self.selection.save(staging / CONFIG_FILE)
            save_file(self.tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
            write_json_atomic(staging / METADATA_FILE, asdict(self.metadata))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, sha256: dict[str, str] | None = None) -> ExpertAdapter:
        """Read an adapter directory, ours or a published ESFT one (any `*.safetensors` shards).

        With `sha256` (file name -> recorded hash: a registry manifest's), each file is read once and its tensors
        are made from the very bytes whose hash was checked: a file damaged on disk never gets in, and nothing is
        read twice (a separate verification pass would read every byte again).
        """
        verified = integrity.read_verified(Path(directory), sha256) if sha256 is not None else None
        header = AdapterHeader.read(directory)
        tensors = {}
        for shard in sorted(set(header.shards.values())):
            if verified is None:
                loaded = load_file(shard)
            elif shard.name not in verified:
                raise InvalidInputError(f"{shard.name} is not one of the adapter's recorded files")
            else:
                loaded = _tensors_in(verified[shard.name], origin=shard.name)
                if {canonical_key(key) for key in loaded} != {k for k, file in header.shards.items() if file == shard}:
                    raise InvalidInputError(f"{shard.name} changed while it was read")
            for key, tensor in loaded.items():
                check_weight(key, tensor, origin=shard.name)
                tensors[canonical_key(key)] = tensor
        return cls(header.selection, tensors, header.metadata)

    def apply(self, model: nn.Module, force: bool = False) -> nn.Module:
        """Copy the adapter's tensors into `model` in place.

        Refused when a key has no place in the model, a shape differs, or (unless `force`) the base
        weights being replaced are not the ones the adapter was trained from.
        """
        views = _tensor_views(model, self.tensors)
        for key, tensor in self.tensors.items():
            check_dtype(key, tensor, origin="the adapter")  # an integer or bool tensor is never cast into weights
        if missing := sorted(set(selected_views(model, self.selection)) - set(self.tensors)):
            raise AdapterMismatchError(f"the adapter lacks {missing[0]}, which its selection replaces in this model")
        for key, tensor in self.tensors.items():
            if views[key].shape != tensor.shape:
                raise AdapterMismatchError(
                    f"adapter tensor {key} has shape {tuple(tensor.shape)}, the base model {tuple(views[key].shape)}"
                )
        expected = self.metadata.base_fingerprint
        if expected and not force and (actual := fingerprint_tensors(views)) != expected:
            raise AdapterMismatchError(
                f"the base model's weights differ from those the adapter was trained on (fingerprint {actual[:12]} "
                f"!= {expected[:12]}); use the adapter's base model ({self.metadata.base_model}) or force it"
            )
        if rounded := [key for key, tensor in self.tensors.items() if _rounds(tensor, views[key].dtype)]:
            logger.warning(
                "warning: %d adapter tensors (%s, ...) are %s and lose precision in the base model's %s",
                len(rounded),
                rounded[0],
                self.tensors[rounded[0]].dtype,
                views[rounded[0]].dtype,
            )
        with torch.no_grad():
            for key, tensor in self.tensors.items():
                views[key].copy_(tensor)
        return model


def _rounds(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    return tensor.dtype != dtype and not torch.equal(tensor.to(dtype).to(tensor.dtype), tensor)


def fingerprint_selection(model: nn.Module, selection: ExpertSelection) -> str:
    """The fingerprint an adapter of `selection` trained from `model` records (see `fingerprint_tensors`)."""
    return fingerprint_tensors(selected_views(model, selection))


def base_fingerprint(base: str | Path) -> str | None:
    """What a local base checkpoint is, wherever it lies: its config and every weight, hashed as an adapter's base
    fingerprint hashes the experts it replaces (`fingerprint_tensors`).

    The registry knows a local base by it, so a base moved, cloned or installed elsewhere keeps its tasks. It leaves
    out what only records how the checkpoint was saved (the transformers version, the dtype: the weights are rounded
    to bfloat16 anyway). Every weight is read, a tensor at a time, memory-mapped: callers cache the result. None
    when `base` is not a directory with a readable `config.json` and safetensors weights (the registry then knows
    it by its path, as it knows a Hub id by its name).
    """
    directory = Path(base)
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files or not (directory / "config.json").is_file():
        return None
    try:
        config = read_json(directory / "config.json")
        if not isinstance(config, dict):
            return None
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(safe_open(file, "pt")) for file in files]
            holder = {key: handle for handle in handles for key in handle.keys()}
            weights = fingerprint_tensors(LazyTensors(holder, lambda key: holder[key].get_tensor(key)))
    except (InvalidInputError, SafetensorError, OSError):
        return None
    identity = json.dumps({k: v for k, v in config.items() if k not in _SAVED_AS}, sort_keys=True)
    return hashlib.sha256(f"{identity}\n{weights}".encode()).hexdigest()


_SAVED_AS = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype"})


class LazyTensors(Mapping):
    """Tensors by key, each read only when asked for: fingerprinting a checkpoint holds one tensor at a time."""

    def __init__(self, keys: Iterable[str], read: Callable[[str], torch.Tensor]):
        self._keys, self._read = list(keys), read

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def fingerprint_tensors(views: Mapping[str, torch.Tensor]) -> str:
    """sha256 of tensors by checkpoint key: names, shapes and values rounded to bfloat16.

    Rounding to bfloat16 makes the fingerprint independent of the dtype the base was loaded in.
    """
    digest = hashlib.sha256()
    for key in sorted(views):
        value = views[key].detach().to(torch.bfloat16).contiguous()
        digest.update(f"{key}:{tuple(value.shape)};".encode())
        digest.update(value.view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()


def selected_views(model: nn.Module, selection: ExpertSelection) -> dict[str, torch.Tensor]:
    """What an adapter of `selection` replaces in `model`, by checkpoint key (views: writing one writes the model)."""
    layers = {layer.index: layer for layer in moe_layers(model)}
    views: dict[str, torch.Tensor] = {}
    for layer_index, expert in selection.pairs:
        layer = layers.get(layer_index)
        if layer is None or expert >= layer.num_experts:
            raise AdapterMismatchError(f"the model has no routed expert {expert} in layer {layer_index}")
        views |= {layer.expert_key(expert, name): view for name, view in expert_views(layer.experts, expert).items()}
    groups = split_parameters(model)
    parameters = dict(model.named_parameters())
    for group, wanted in (("shared", selection.shared_experts), ("non_expert", selection.non_expert_modules)):
        if wanted:
            views |= {name: parameters[name] for name in groups[group]}
    return views


def _tensor_views(model: nn.Module, keys) -> dict[str, torch.Tensor]:
    """The model tensors that checkpoint keys name; routed-expert keys resolve into the fused Parameters."""
    layers = {layer.prefix: layer for layer in moe_layers(model)}
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    views = {}
    for key in keys:
        parsed = parse_expert_key(key)
        if parsed and parsed.prefix in layers:
            layer, expert = layers[parsed.prefix], parsed.expert
            view = expert_views(layer.experts, expert).get(parsed.tensor) if expert < layer.num_experts else None
        else:
            view = named.get(key)
        if view is None:
            raise AdapterMismatchError(f"adapter tensor {key} has no counterpart in the base model")
        views[key] = view
    return views
