"""`merge_tasks`: a base checkpoint with tasks' experts written into it, as a model directory any runtime loads.

For runtimes that are not expert-hub's server (TGI, SGLang, plain vLLM, llama.cpp after conversion). The base is
rewritten shard by shard, never loaded: every shard is copied by the kernel, and in a shard that holds the tasks'
tensors each of those is then written over its bytes, so memory holds one tensor at a time. Only `dtype` casts read
a shard whole (its size changes), so memory then stays near the largest shard. The merged checkpoint keeps the
base's own tensor names and layout (per-expert keys, Mixtral's w1/w3/w2, gpt_oss' fused experts), so whatever
loads the base loads it. The directory appears complete or not at all; a killed merge, rerun, keeps the shards it
finished (`io.resumable_directory`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import CONFIG_FILE, AdapterHeader, stored_key
from .checkpoint import INDEX_FILE, BaseCheckpoint, Place
from .errors import AdapterMismatchError, InvalidInputError
from .families import parse_expert_key
from .io import fsync_path, resumable_directory, writable_directory, write_json_atomic

OnOverlap = Literal["refuse", "first"]
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a model directory holds besides its weights and card; every other file of the base is copied.
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|msgpack|h5|gguf)|README\.md|" + re.escape(INDEX_FILE))


@dataclass(frozen=True)
class MergedTask:
    """One task to merge: what the user named, its adapter directory and the digest that identifies its files."""

    name: str  # `law@2` for a registry reference; a directory's task (from its metadata) or its name
    directory: Path
    digest: str
    header: AdapterHeader


@dataclass
class MergeResult:
    directory: Path
    tasks: list[MergedTask]
    overridden: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # task -> experts an earlier task won
    shards_copied: int = 0
    shards_rewritten: int = 0
    shards_resumed: int = 0


@dataclass(frozen=True)
class _Write:
    """One adapter tensor to write into the base shard that holds its place."""

    place: Place
    adapter_file: Path
    adapter_key: str


def resolve_task(reference: str, base: str) -> MergedTask:
    """A registry reference (`law`, `law@2`: verified first) or an adapter directory, read without its weights."""
    from .registry import Registry
    from .registry.store import content_digest

    if Path(reference).is_dir():
        directory = Path(reference)
        if not (directory / CONFIG_FILE).is_file() and (directory / "adapter_config.json").is_file():
            raise InvalidInputError(
                f"{directory} is a LoRA adapter: merge it with PEFT's merge_and_unload(); expert-hub merges experts"
            )
        header = AdapterHeader.read(directory)
        name = header.metadata.task or directory.resolve().name
        return MergedTask(name, directory, content_digest(directory), header)
    registry = Registry()
    entry = registry.resolve(reference, base)
    directory = registry.verify(entry)
    return MergedTask(entry.ref, directory, entry.digest, AdapterHeader.read(directory))


def local_base(base: str) -> Path:
    """The base checkpoint's directory: `base` itself, or its Hub snapshot (downloaded once, then cached)."""
    if Path(base).is_dir():
        return Path(base)
    from .registry.hub import download_model

    return download_model(base)


@dataclass
class MergePlan:
    """A checked merge, before anything is written: what each base shard gets from which task."""

    base: str
    out: Path
    checkpoint: BaseCheckpoint
    tasks: list[MergedTask]
    owners: dict[tuple[int, int], int]  # (layer, expert) -> the index of the task that writes it
    writes: dict[Path, list[_Write]]  # base shard -> the adapter tensors that go into it
    dtype: str = "auto"
    on_overlap: OnOverlap = "refuse"
    overwrite: bool = False

    def write(self, progress: Callable[[str], None] | None = None) -> MergeResult:
        """Write the merged model directory; `progress` is told each shard's name when it is done."""
        result = MergeResult(self.out, self.tasks, _overridden(self.tasks, self.owners))
        torch_dtype, kept = DTYPES[self.dtype], self._kept_float32()
        with resumable_directory(self.out, self._identity(), self.overwrite) as staging:
            for file in self.checkpoint.files:
                target = staging / file.name
                if target.exists():
                    result.shards_resumed += 1
                elif torch_dtype is not None or _widened(file, self.writes.get(file, []), kept):
                    _rewrite_shard(self.checkpoint, file, self.writes.get(file, []), target, torch_dtype, kept)
                    result.shards_rewritten += 1
                elif file in self.writes:
                    _patch_shard(self.checkpoint, file, self.writes[file], target)
                    result.shards_rewritten += 1
                else:
                    # the kernel copies (copy_file_range / sendfile): no byte passes through Python
                    _put_in_place(target, functools.partial(shutil.copyfile, file))
                    result.shards_copied += 1
                if progress is not None:
                    progress(file.name)
            _write_rest(self.checkpoint, staging, self.dtype)
            _model_card(self.base, self.checkpoint, result).save(staging / "README.md")
        return result

    def _kept_float32(self) -> list[re.Pattern]:
        """The tensors transformers holds in float32 when it loads the merged model in its dtype (gpt_oss' norms at
        float16, DeepSeek-V3's routing bias at 16 bits), whatever dtype they are stored in."""
        name = (
            self.dtype
            if self.dtype != "auto"
            else self.checkpoint.config.get("dtype", self.checkpoint.config.get("torch_dtype"))
        )
        loaded = DTYPES.get(name) or torch.float32
        plan = self.checkpoint.model._get_dtype_plan(loaded)  # type: ignore[operator]  # private, so untyped
        return [re.compile(pattern) for pattern in plan]

    def _identity(self) -> str:
        """What a rerun must match to keep an interrupted run's shards: the base's files, the tasks, the options."""
        files = [[file.name, file.stat().st_size, file.stat().st_mtime_ns] for file in self.checkpoint.files]
        base = [str(self.checkpoint.directory.resolve()), files]
        tasks = [task.digest for task in self.tasks]
        return json.dumps({"base": base, "tasks": tasks, "dtype": self.dtype, "on_overlap": self.on_overlap})


def plan_merge(
    base: str,
    tasks: list[str],
    out: str | Path,
    dtype: str = "auto",
    on_overlap: OnOverlap = "refuse",
    force: bool = False,
    overwrite: bool = False,
) -> MergePlan:
    """Check that `tasks` can be merged into `base`, reading headers and the base experts they replace only.

    `tasks` are registry references or adapter directories. Tasks whose experts overlap are refused, or with
    `on_overlap="first"` the first task named keeps each contested expert. A task that trained shared experts or
    non-expert modules merges alone. Each task's base fingerprint is checked as `load_model` checks it (`force`
    skips that check only). `dtype` other than auto casts the floating-point weights.
    """
    if dtype not in DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if on_overlap not in ("refuse", "first"):
        raise InvalidInputError(f"--on-overlap must be refuse or first, not {on_overlap!r}")
    if not tasks:
        raise InvalidInputError("name at least one task to merge")
    out = writable_directory(out, overwrite)
    checkpoint = BaseCheckpoint(local_base(base))
    merged = [resolve_task(reference, base) for reference in tasks]
    for source in (checkpoint.directory, *(task.directory for task in merged)):
        if source.resolve().is_relative_to(out.resolve()):
            raise InvalidInputError(f"--out {out} holds {source}, which the merge reads: write it somewhere else")
    owners = _owners(merged, on_overlap)
    for task in merged:
        task.header.check_values()  # finite floating-point weights, one tensor at a time, before anything is written
        if missing := sorted(set(checkpoint.selected_keys(task.header.selection)) - set(task.header.shards)):
            raise AdapterMismatchError(f"task {task.name} lacks {missing[0]}, which its selection replaces")
        expected = task.header.metadata.base_fingerprint
        if expected and not force and (actual := checkpoint.fingerprint(task.header.selection)) != expected:
            raise AdapterMismatchError(
                f"task {task.name} was trained from other base weights than {base} (fingerprint {actual[:12]} != "
                f"{expected[:12]}); merge it into its own base ({task.header.metadata.base_model}) or pass --force"
            )
    writes = _writes(checkpoint, merged, owners)
    return MergePlan(base, out, checkpoint, merged, owners, writes, dtype, on_overlap, overwrite)


def merge_tasks(
    base: str,
    tasks: list[str],
    out: str | Path,
    dtype: str = "auto",
    on_overlap: OnOverlap = "refuse",
    force: bool = False,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> MergeResult:
    """`plan_merge` then `MergePlan.write`: `base` with `tasks`' experts in place, as the model directory `out`."""
    return plan_merge(base, tasks, out, dtype, on_overlap, force, overwrite).write(progress)


def _owners(tasks: list[MergedTask], on_overlap: OnOverlap) -> dict[tuple[int, int], int]:
    """Which task writes each (layer, expert): refused on overlap, or the first task named wins it."""
    if len(tasks) > 1 and (
        alone := [t for t in tasks if t.header.selection.shared_experts or t.header.selection.non_expert_modules]
    ):
        raise InvalidInputError(
            f"task {alone[0].name} also trained shared experts or non-expert modules, which every task would share: "
            "merge it alone"
        )
    owners: dict[tuple[int, int], int] = {}
    contested: dict[tuple[int, int], list[str]] = {}
    for index, task in enumerate(tasks):
        for pair in task.header.selection.pairs:
            if pair in owners:
                contested.setdefault(pair, [tasks[owners[pair]].name]).append(task.name)
            else:
                owners[pair] = index
    if contested and on_overlap == "refuse":
        listed = ", ".join(
            f"layer {layer} expert {expert} ({' and '.join(names)})"
            for (layer, expert), names in sorted(contested.items())[:8]
        )
        more = f" and {len(contested) - 8} more" if len(contested) > 8 else ""
        raise InvalidInputError(
            f"the tasks share {len(contested)} experts: {listed}{more}; merge them into separate models, or pass "
            "--on-overlap first to let the first task named keep each of them"
        )
    return owners


def _overridden(tasks: list[MergedTask], owners: dict[tuple[int, int], int]) -> dict[str, list[tuple[int, int]]]:
    lost = {
        task.name: sorted(pair for pair in task.header.selection.pairs if owners[pair] != index)
        for index, task in enumerate(tasks)
    }
    return {name: pairs for name, pairs in lost.items() if pairs}


def _writes(checkpoint: BaseCheckpoint, tasks: list[MergedTask], owners) -> dict[Path, list[_Write]]:
    """Every adapter tensor that goes into the merged model, grouped by the base shard that holds its place."""
    writes: dict[Path, list[_Write]] = {}
    for index, task in enumerate(tasks):
        for key, adapter_file in sorted(task.header.shards.items()):
            parsed = parse_expert_key(key)
            if parsed is not None and owners.get((parsed.layer, parsed.expert)) != index:
                continue
            place = checkpoint.place(key)
            _check_shape(checkpoint, place, adapter_file, key)
            writes.setdefault(checkpoint.shard_of[place.key], []).append(_Write(place, adapter_file, key))
    return writes


def _check_shape(checkpoint: BaseCheckpoint, place: Place, adapter_file: Path, key: str) -> None:
    """The adapter tensor has the shape of its place in the base, read from both files' headers."""
    with safe_open(adapter_file, "pt") as adapter, safe_open(checkpoint.shard_of[place.key], "pt") as base:
        shape, stored = adapter.get_slice(stored_key(adapter, key)).get_shape(), base.get_slice(place.key).get_shape()
    if place.expert is not None:  # the expert's slab of a fused tensor
        stored = [1, *stored[1:]]
    expected = checkpoint.view(place, torch.empty(stored, device="meta")).shape
    if tuple(shape) != tuple(expected):
        raise AdapterMismatchError(f"adapter tensor {key} has shape {tuple(shape)}, the base {tuple(expected)}")


def _patch_shard(checkpoint: BaseCheckpoint, file: Path, writes: list[_Write], target: Path) -> None:
    """The base shard copied by the kernel, then each tensor the tasks change written over its bytes in the copy.

    The shard never passes through memory: one changed tensor at a time does (an expert's matrix, or a layer's
    fused experts), and every other byte, header included, is the base's.
    """
    starts = _tensor_starts(file)

    def write(partial: Path) -> None:
        shutil.copyfile(file, partial)  # the kernel copies (copy_file_range / sendfile): no byte passes through Python
        with partial.open("r+b") as out:
            for key, key_writes in _by_tensor(writes).items():
                with safe_open(file, "pt") as base:  # a handle per tensor: it keeps what it mapped until it closes
                    tensor = base.get_tensor(key)
                    _write_into(checkpoint, tensor, key_writes)
                    out.seek(starts[key])
                    out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    _put_in_place(target, write)


def _rewrite_shard(
    checkpoint: BaseCheckpoint,
    file: Path,
    writes: list[_Write],
    target: Path,
    dtype: torch.dtype | None,
    kept: list[re.Pattern],
) -> None:
    """Read one base shard whole, cast it to `dtype` (None: keep each tensor's), write the tasks' tensors into it,
    and save it under `target`.

    Cast first, then write: an adapter tensor is rounded once, to the dtype the merged model has, as `load_model`
    with that dtype rounds it. Tensors the model holds in float32 at that dtype (`kept`) are stored in float32, so an
    adapter tensor written into one is not rounded either.
    """
    with safe_open(file, "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and any(pattern.search(key) for pattern in kept):
            tensors[key] = tensor.to(torch.float32)
        elif tensor.is_floating_point() and dtype is not None:
            tensors[key] = tensor.to(dtype)
    for key, key_writes in _by_tensor(writes).items():
        _write_into(checkpoint, tensors[key], key_writes)
    _put_in_place(target, lambda partial: save_file(tensors, partial, metadata=metadata))


def _widened(file: Path, writes: list[_Write], kept: list[re.Pattern]) -> bool:
    """Whether a task's tensor goes into one the model holds in float32 but the shard stores narrower: patching its
    bytes would round the task's weights, so the shard is rewritten with that tensor widened."""
    targets = {write.place.key for write in writes if any(pattern.search(write.place.key) for pattern in kept)}
    if not targets:
        return False
    with safe_open(file, "pt") as handle:
        return any(handle.get_slice(key).get_dtype() != "F32" for key in targets)


def _by_tensor(writes: list[_Write]) -> dict[str, list[_Write]]:
    grouped: dict[str, list[_Write]] = {}
    for write in writes:
        grouped.setdefault(write.place.key, []).append(write)
    return grouped


@torch.no_grad()
def _write_into(checkpoint: BaseCheckpoint, stored: torch.Tensor, writes: list[_Write]) -> None:
    """Copy each adapter tensor into its place in `stored`, a checkpoint tensor (rounded to its dtype)."""
    for write in writes:
        with safe_open(write.adapter_file, "pt") as adapter:
            value = adapter.get_tensor(stored_key(adapter, write.adapter_key))
        checkpoint.view(write.place, stored).copy_(value)


def _tensor_starts(file: Path) -> dict[str, int]:
    """Where each tensor's bytes begin in a safetensors file: after the 8-byte header length and the JSON header."""
    with file.open("rb") as shard:
        length = int.from_bytes(shard.read(8), "little")
        header = json.loads(shard.read(length))
    return {key: 8 + length + record["data_offsets"][0] for key, record in header.items() if key != "__metadata__"}


def _put_in_place(target: Path, write: Callable[[Path], None]) -> None:
    """Have `write` fill a file beside `target`, flush it to disk, then rename it: a shard there is a whole one."""
    partial = target.with_name(f".{target.name}.partial")
    write(partial)
    fsync_path(partial)
    os.replace(partial, target)


def _write_rest(checkpoint: BaseCheckpoint, staging: Path, dtype: str) -> None:
    """The index, the config (with the new dtype) and every other file of the base: tokenizer, generation config."""
    for path in sorted(checkpoint.directory.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not _NOT_COPIED.fullmatch(path.name):
            shutil.copyfile(path, staging / path.name)
    if dtype != "auto":
        config = dict(checkpoint.config)
        for name in {"dtype", "torch_dtype"} & set(config) or {"dtype"}:
            config[name] = dtype
        write_json_atomic(staging / "config.json", config)
    if (checkpoint.directory / INDEX_FILE).is_file():
        index = json.loads((checkpoint.directory / INDEX_FILE).read_text(encoding="utf-8"))
        index.setdefault("metadata", {})["total_size"] = _total_size(staging, checkpoint.files)
        write_json_atomic(staging / INDEX_FILE, index)


def _total_size(staging: Path, files: list[Path]) -> int:
    """The index's `total_size`: every tensor's bytes, which is each file less its 8-byte length and header."""
    total = 0
    for file in files:
        with (staging / file.name).open("rb") as shard:
            total += os.fstat(shard.fileno()).st_size - 8 - int.from_bytes(shard.read(8), "little")
    return total


def _hub_id(base: str, tasks: list[MergedTask]) -> str | None:
    """The base's Hub id: `base` itself, or, for a local directory, the Hub model every task records as its base."""
    from .registry.card import is_local_path

    if not is_local_path(base):
        return base
    recorded = {task.header.metadata.base_model for task in tasks}
    trained_from = recorded.pop() if len(recorded) == 1 else None
    return trained_from if trained_from and not is_local_path(trained_from) else None


def _model_card(base: str, checkpoint: BaseCheckpoint, result: MergeResult):
    from huggingface_hub import ModelCard, ModelCardData

    hub_id = _hub_id(base, result.tasks)
    names = [task.name for task in result.tasks]
    card_data = ModelCardData(
        base_model=hub_id,
        base_model_relation="merge" if hub_id else None,
        pipeline_tag="text-generation",
        library_name="transformers",
        tags=["esft", "moe", "expert-hub", *(name.split("@")[0] for name in names)],
    )
    lines = [
        f"# {' + '.join(names)} merged into {hub_id or checkpoint.directory.name}",
        "",
        "The base model with the routed experts that Expert-Specialized Fine-Tuning (ESFT, arXiv 2407.01906) trained "
        "for each task written in place, by `expert-hub merge`. Every other weight is the base's; tensor names and "
        "layout are the base checkpoint's, so whatever loads the base loads this model.",
        "",
        f"- Base: {hub_id or f'a local checkpoint ({checkpoint.directory.name}), not on the Hub'}",
        "",
        "| task | digest | experts | layers |",
        "|---|---|---|---|",
    ]
    for task in result.tasks:
        counts = [len(ids) for ids in task.header.selection.experts.values()]
        lines.append(f"| {task.name} | `{task.digest[:16]}` | {sum(counts)} | {len(counts)} |")
    lines.append("")
    if result.overridden:
        lines.append(
            "Overlapping experts went to the task named first (`--on-overlap first`); in those experts the "
            "later tasks run an earlier task's weights, so they may score below their own adapters:"
        )
        lines += [
            f"- {name}: {len(pairs)} experts taken by an earlier task" for name, pairs in result.overridden.items()
        ]
    elif len(result.tasks) > 1:
        lines.append("The tasks' experts do not overlap: each task runs exactly its own adapter's experts.")
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
