"""`benchmarks/paper_table.py --scale quick`: the same code as the committed report, on two steps per run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the paper table's runs: `make test-fast` leaves it out

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_table.py"


def test_the_quick_paper_table_measures_every_method_and_resumes(tmp_path):
    command = [sys.executable, str(SCRIPT), "--scale", "quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "runs to go" in first.stdout

    report = (tmp_path / "out" / "paper_table_quick.md").read_text()
    for section in ("## Findings", "## Summary", "## Per task", "## Learning-rate sweep", "## Ablation: p"):
        assert section in report
    assert (tmp_path / "out" / "paper_table_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    every_run = json.loads((tmp_path / "out" / "paper_table_quick.json").read_text())
    main = [run for run in every_run["runs"] if run["kind"] == "main"]
    assert {(run["method"], run["mix"]) for run in main} == {
        (method, mix) for method in ("esft-token", "esft-gate", "full", "lora") for mix in (False, True)
    }
    figures = {run["method"]: run for run in main if not run["mix"]}
    for method in ("esft-token", "esft-gate", "lora"):  # a fraction of full fine-tuning's weights, trained and shipped
        assert 0 < figures[method]["trainable_parameters"] < figures["full"]["trainable_parameters"]
        assert 0 < figures[method]["artifact_bytes"] < figures["full"]["artifact_bytes"]
    scores = {key for run in main for key in run["scores"]}
    assert {"law@4", "math@4", "code@4", "summary@4", "intent@4", "translation@4", "general@4"} == scores
    # general ability: the tasks the base was pretrained on, not the held-out ones it scores about 0 on
    base = next(run for run in every_run["runs"] if run["kind"] == "base")["scores"]
    for run in main:
        pretrained = [run["scores"][f"{name}@4"] for name in ("math", "code", "summary")]
        assert run["general"] == pytest.approx(sum(pretrained) / 3)
        others = [name for name in ("intent", "translation") if name != run["task"]]
        change = sum(run["scores"][f"{n}@4"] - base[f"{n}@4"] for n in others) / len(others)
        assert run["held_out_change"] == pytest.approx(change)
    modules = {run["variant"]: run for run in every_run["runs"] if run["kind"] == "modules"}
    assert (
        figures["esft-token"]["trainable_parameters"]
        < modules["shared_experts"]["trainable_parameters"]
        < modules["non_expert_modules"]["trainable_parameters"]
    )

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)  # every run is kept: none reruns
    assert again.returncode == 0 and "runs to go" not in again.stdout
