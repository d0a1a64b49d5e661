"""The demo base: a small pretrained MoE shipped inside the package, so every command works offline.

`expert-hub` uses it whenever `--base` is omitted. Its recipe (`benchmarks/demo_base/pretrain.py`, run by
`make demo-base`) is not shipped; what it ran with, its timing, what the base scores on each built-in task and how
it routes sit in `base/expert_hub_base.json` (`models.base_metadata`).
"""

from __future__ import annotations

from pathlib import Path

DEMO_BASE = Path(__file__).parent / "base"


def demo_base() -> str:
    return str(DEMO_BASE)
