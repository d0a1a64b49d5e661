"""The demo base: a small pretrained MoE shipped inside the package, so every command works offline.

`expert-hub` uses it whenever `--base` is omitted. `pretrain.py` is the recipe that made it; the recipe, its
timing, what the base scores on each built-in task and how it routes sit in `base/expert_hub_base.json`.
"""

from __future__ import annotations

from pathlib import Path

from ..io import read_json

DEMO_BASE = Path(__file__).parent / "base"
METADATA = "expert_hub_base.json"


def demo_base() -> str:
    return str(DEMO_BASE)


def base_metadata(base: str) -> dict:
    """The `expert_hub_base.json` a local base ships (the demo base does), or {}."""
    path = Path(base) / METADATA
    return read_json(path) if path.is_file() else {}
