"""`expert-hub quickstart`, run as a user runs it: train on the demo base, serve, query, and stop the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from expert_hub.registry import Registry
from expert_hub.tasks import BUILTIN_TASKS

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
    assert (tmp_path / "runs/quickstart/law/adapter").is_dir() and (tmp_path / "runs/quickstart/server.log").is_file()
    # the server and its engine process are gone
    for pattern in (f"expert_hub.cli serve --tasks law --port {PORT}", "VLLM::EngineCore"):
        assert subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 1, pattern
