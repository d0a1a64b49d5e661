"""Starting `expert-hub serve` as users do (the options docs/serving.md gives, no extra environment) and talking to
it over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

API_KEY = "sk-test"
CONTEXT = 4096  # a base's context with room for requests that stay in flight for seconds even on a fast machine
LONG = 4000  # tokens of such a request (480 ended within a second on CI's machine)


class Server:
    def __init__(self, url: str, process: subprocess.Popen, base: str):
        self.url, self.process, self.base = url, process, base

    def request(self, method: str, path: str, body=None, key: str | None = API_KEY, headers=None):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"content-type": "application/json", **(headers or {})}
        )
        if key:
            request.add_header("authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, _decoded(response)
        except urllib.error.HTTPError as error:
            return error.code, _decoded(error)

    def complete(self, model: str, prompt: str, max_tokens: int, **extra) -> dict:
        status, body = self.request(
            "POST",
            "/v1/completions",
            {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "logprobs": 0,
                "return_token_ids": True,
                **extra,
            },
        )
        assert status == 200, body
        choice = body["choices"][0]
        return {
            "model": body["model"],
            "token_ids": choice["token_ids"],
            "prompt_token_ids": choice["prompt_token_ids"],
            "logprobs": choice["logprobs"]["token_logprobs"],
            "usage": body["usage"],
        }

    def counters(self) -> dict[str, float]:
        """expert-hub's per-task counters (requests, tokens, auto routing) from /metrics."""
        status, text = self.request("GET", "/metrics")
        assert status == 200
        return {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.decode().splitlines()
            if line.startswith("expert_hub_") and "_total{" in line
        }


def _decoded(response):
    """JSON bodies parsed, others (Prometheus text, HTML, CORS answers) as bytes."""
    body = response.read()
    return json.loads(body or b"null") if response.headers.get_content_type() == "application/json" else body


def start_server(
    root: Path, base: Path, tasks: str, registry_home: Path, port: int, extra: list[str], max_model_len: int = 512
) -> Server:
    """`expert-hub serve` with the documented options; the registry home is the one setting a user gives too."""
    script = Path(sys.executable).with_name("expert-hub")
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [
            str(script),
            "serve",
            "--base",
            str(base),
            "--tasks",
            tasks,
            "--port",
            str(port),
            "--api-key",
            API_KEY,
            "--dtype",
            "float32",
            "--max-model-len",
            str(max_model_len),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ | {"EXPERT_HUB_HOME": str(registry_home)},
    )
    server = Server(f"http://127.0.0.1:{port}", process, str(base))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {(root / 'server.log').read_text()[-3000:]}")
        try:
            if server.request("GET", "/health", key=None)[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(1)
    process.kill()
    pytest.fail("the server did not start in 300 s")
