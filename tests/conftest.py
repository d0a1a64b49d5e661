"""Shared fixtures: tiny random models of every supported family, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub; fail fast instead of retrying

from expert_hub.testing import TINY_FAMILIES, build_tiny_model

from .hub_server import HubServer

ESFT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "esft"


@pytest.fixture(scope="session")
def esft_data() -> Path:
    if not ESFT_DATA.is_dir():  # CI and the team's checkouts have it; a bare clone elsewhere skips what needs it
        pytest.skip(f"the ESFT reference data is not at {ESFT_DATA} (see its README.md)")
    return ESFT_DATA


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny_model(family, root / family) for family in TINY_FAMILIES}


@pytest.fixture(autouse=True)
def registry_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty registry; none ever touches the user's."""
    home = tmp_path / "expert-hub-home"
    monkeypatch.setenv("EXPERT_HUB_HOME", str(home))
    return home


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run the `expert-hub` entry point in-process; returns (exit code, stdout, stderr)."""
    from expert_hub.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["expert-hub", *map(str, args)])
        monkeypatch.setenv("COLUMNS", "200")
        capsys.readouterr()  # drop what earlier steps printed
        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


TOKEN = "hf_test_token"  # the fake Hub's write token


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running server, with huggingface_hub pointed at it (its settings are read at import, so patch them)."""
    from huggingface_hub import constants

    server = HubServer(tokens={TOKEN}).start()
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.stop()
