"""The artifact each method ships, written atomically with the same `expert_hub.json` metadata.

- ESFT: an expert adapter (only the trained experts; the model's rows already merged), loadable with
  `load_model(base, adapter)`.
- lora: a PEFT adapter directory. full: a complete `save_pretrained` checkpoint with its tokenizer.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from torch import nn

from ..adapter import METADATA_FILE, AdapterMetadata, ExpertAdapter
from ..io import atomic_directory, write_json_atomic
from ..selection import DEFAULT_TOP_P, ExpertSelection
from .config import TrainingConfig


def write_artifact(model: nn.Module, config: TrainingConfig, path: Path, selection: ExpertSelection | None,
                   fingerprint: str | None, tokenizer, summary: dict) -> Path:
    metadata = dict(
        task=config.task,
        method=config.method,
        score_function=config.score_function,
        top_p=(config.top_p or DEFAULT_TOP_P[config.score_function]) if config.score_function else None,
        base_model=config.base,
        metrics={key: summary[key] for key in ("train_loss", "eval_loss") if summary.get(key) is not None},
        training={"config": config.to_json(), **summary},
    )
    if selection is not None:
        adapter = ExpertAdapter.from_model(model, selection, base_fingerprint=fingerprint, **metadata)
        return adapter.save(path, overwrite=True)
    with atomic_directory(path, overwrite=True) as staging:
        model.save_pretrained(staging)
        if config.method == "full":
            tokenizer.save_pretrained(staging)
        write_json_atomic(staging / METADATA_FILE, asdict(AdapterMetadata(**metadata)))
    return path
