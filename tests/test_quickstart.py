"""`expert-hub quickstart`, run as a user runs it: train on the demo base, serve, query, and stop the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from expert_hub.cli import quickstart
from expert_hub.demo import demo_base
from expert_hub.registry import Registry
from expert_hub.tasks import BUILTIN_TASKS
from expert_hub.training import base_training_defaults

pytestmark = pytest.mark.slow  # the whole product, end to end: `make test-fast` leaves it out

PORT = 8655


def test_quickstart_trains_serves_answers_and_stops_the_server(tmp_path, registry_home):
    script = Path(sys.executable).with_name("expert-hub")
    result = subprocess.run(
        [str(script), "quickstart", "--tasks", "law", "--steps", "3", "--eval-records", "4", "--port", str(PORT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={
            "COLUMNS": "240",
            "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
            "HOME": str(tmp_path),
            "EXPERT_HUB_HOME": str(registry_home),
            "HF_HUB_OFFLINE": "1",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "ESFT on the demo base" in out and "One request per model" in out and "where things are" in out
    _question, reference = BUILTIN_TASKS["law"].examples("eval", 1)[0]
    assert reference["content"] in out  # the answers table shows the reference next to each answer
    assert [entry.ref for entry in Registry(registry_home).entries()] == ["law@1"]
    assert len(list(tmp_path.glob("runs/quickstart/law-*/adapter"))) == 1
    assert (tmp_path / "runs/quickstart/server.log").is_file()
    # the server and its engine process are gone
    for pattern in (f"expert_hub.cli serve --tasks law --port {PORT}", "VLLM::EngineCore"):
        assert subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 1, pattern


def test_quickstart_reruns_with_any_of_its_options(run_cli, tmp_path, registry_home, monkeypatch):
    """`quickstart`, again, `--steps N`, then with another registry: each setting's run is its own, a finished run
    is reused, and experts already registered are not registered again. (The server is the test above's.)"""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(quickstart, "_ask_server", lambda *args: [])
    cheaper = {"score_tokens": 1024, "seq_len": 64}  # the demo base's defaults, scoring and training on less
    monkeypatch.setattr(quickstart, "base_training_defaults", lambda base: base_training_defaults(base) | cheaper)
    other_home = tmp_path / "other-home"
    digests = {}
    for steps, home, trains, refs in (
        (3, registry_home, True, ["law@1"]),
        (3, registry_home, False, ["law@1"]),
        (2, registry_home, True, ["law@1", "law@2"]),
        (3, other_home, False, ["law@1"]),
    ):
        monkeypatch.setenv("EXPERT_HUB_HOME", str(home))
        code, out, err = run_cli("quickstart", "--tasks", "law", "--steps", str(steps), "--eval-records", "2")
        assert code == 0, err
        assert (f"Trained {steps} steps" in out) == trains and ("Reusing" in out) != trains, out
        entries = Registry(home).entries()
        assert [entry.ref for entry in entries] == refs
        assert digests.setdefault(steps, entries[-1].digest) == entries[-1].digest
    assert len(list(tmp_path.glob("runs/quickstart/law-*/adapter"))) == 2


def test_quickstart_help_shows_the_demo_base_default(run_cli):
    code, out, _ = run_cli("quickstart", "--help")
    assert code == 0 and f"[default: {base_training_defaults(demo_base())['steps']};" in " ".join(out.split())
