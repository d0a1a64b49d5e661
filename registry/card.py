"""The model card pushed with a task's experts: Hub metadata in YAML, then what the experts are and how to use them."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from expert_hub.adapter import AdapterMetadata
from expert_hub.selection import ExpertSelection


def model_card(repo_id: str, task: str, selection: ExpertSelection, metadata: AdapterMetadata,
               license: str = "other") -> ModelCard:
    counts = [len(ids) for ids in selection.experts.values()] or [0]
    training = metadata.training or {}
    config = training.get("config", {})
    data = config.get("data")
    hub_dataset = data if data and not Path(data).exists() and data.count("/") == 1 and not data.endswith(".jsonl") else None
    card_data = ModelCardData(
        base_model=metadata.base_model if metadata.base_model and not Path(metadata.base_model).exists() else None,
        base_model_relation="adapter",
        library_name="expert-hub",
        tags=["esft", "moe", task],
        license=license,
        datasets=[hub_dataset] if hub_dataset else None,
    )
    selected = f"score function `{metadata.score_function}` with top-p {metadata.top_p}" if metadata.score_function \
        else "a given expert configuration"
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
        lines.append(f"- Trained: {training.get('steps')} steps, learning rate {config.get('learning_rate') or 'default'}, "
                     f"sequence length {config.get('seq_len')}, on {data}")
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
