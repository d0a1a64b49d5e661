"""The model card pushed with a task's experts: Hub metadata in YAML, then what the experts are and how to use them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from expert_hub.adapter import AdapterMetadata
from expert_hub.selection import ExpertSelection


def is_local_path(value) -> bool:
    return isinstance(value, str) and (Path(value).is_absolute() or Path(value).exists())


def public_metadata(metadata: AdapterMetadata, base_model: str | None) -> AdapterMetadata:
    """The metadata as published: the base's Hub id instead of a local directory, and no local paths at all.

    Locally the registry keeps absolute paths (they find the base again); on the Hub they would only leak the
    uploader's directories. A local path keeps its last component (`train.jsonl`), which says what it was.
    """
    training = dict(metadata.training or {})
    if isinstance(training.get("config"), dict):
        training["config"] = {
            key: Path(value).name if is_local_path(value) else value for key, value in training["config"].items()
        }
    public_base = base_model or (None if is_local_path(metadata.base_model) else metadata.base_model)
    if public_base and isinstance(training.get("config"), dict):
        training["config"]["base"] = public_base
    return replace(metadata, base_model=public_base, training=training)


def model_card(
    repo_id: str, task: str, selection: ExpertSelection, metadata: AdapterMetadata, license: str = "other"
) -> ModelCard:
    """The card for `metadata` as `public_metadata` leaves it."""
    counts = [len(ids) for ids in selection.experts.values()] or [0]
    training = metadata.training or {}
    config = training.get("config", {})
    data = config.get("data")
    hub_dataset = data if data and data.count("/") == 1 and not data.endswith(".jsonl") else None
    card_data = ModelCardData(
        base_model=metadata.base_model,
        pipeline_tag="text-generation",
        base_model_relation="adapter",
        library_name="expert-hub",
        tags=["esft", "moe", task],
        license=license,
        datasets=[hub_dataset] if hub_dataset else None,
    )
    selected = (
        f"score function `{metadata.score_function}` with top-p {metadata.top_p}"
        if metadata.score_function
        else "a given expert configuration"
    )
    lines = [
        f"# {task} experts for {metadata.base_model or 'its base model'}",
        "",
        f"Expert-Specialized Fine-Tuning (ESFT, arXiv 2407.01906) adapter for the task **{task}**: only the routed "
        f"experts the task uses most were trained, and only they are stored here. They replace the base model's "
        f"experts of the same ids; everything else is the base model unchanged.",
        "",
        f"- Experts: {sum(counts)} over {len(selection.experts)} MoE layers ({min(counts)}-{max(counts)} per layer)"
        + (", plus the shared experts" if selection.shared_experts else "")
        + (", plus the non-expert modules" if selection.non_expert_modules else ""),
        f"- Selected by: {selected} (method `{metadata.method or 'unknown'}`)",
    ]
    if training:
        lines.append(
            f"- Trained: {training.get('steps')} steps, learning rate {config.get('learning_rate') or 'default'}, "
            f"sequence length {config.get('seq_len')}, on {data}"
        )
    if metadata.metrics:
        lines.append("- Metrics: " + ", ".join(f"{name} {value:.4g}" for name, value in metadata.metrics.items()))
    if metadata.base_fingerprint:
        lines.append(f"- Base weights fingerprint: `{metadata.base_fingerprint[:16]}…`")
    lines += [
        "",
        "## Use",
        "```bash",
        f"expert-hub pull {repo_id}",
        f"expert-hub serve --base {metadata.base_model or 'BASE_MODEL'} --tasks {task}",
        "```",
        "or in Python:",
        "```python",
        "import expert_hub",
        f'model = expert_hub.load_model("{metadata.base_model or "BASE_MODEL"}", "{task}")',
        "```",
        "",
        "`expert_cfg.json` lists the experts per layer (the ESFT reference schema), `experts.safetensors` holds their "
        "weights under per-expert checkpoint keys, `expert_hub.json` the training metadata.",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
