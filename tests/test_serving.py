"""`expert-hub serve` on the real vLLM CPU engine: every task gives the tokens of its merged checkpoint.

One server per base model runs for the whole module (tiny qwen3_moe, compiled: 3 served tasks with overlapping and
disjoint experts, one more loaded at run time; tiny deepseek_v2, eager: 2 tasks, more loaded to fill the bank); the
oracle is plain vLLM on each task's merged checkpoint (base + experts, `save_pretrained`), run once, one request at
a time, in a separate process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from expert_hub import ExpertAdapter, ExpertSelection, load_model
from expert_hub.auto_routing import RoutingProfile
from expert_hub.models import load_base
from expert_hub.registry import Registry
from expert_hub.testing import SERVING_SHAPES, build_tiny_model, byte_tokenizer

from .fake_bank import FakeBankedLayer
from .serving_client import API_KEY, Server, start_server
from .serving_oracle import make_tasks, plain_vllm_tokens, profile_tasks

pytestmark = pytest.mark.slow  # vLLM servers: `make test-fast` leaves it out

PROMPTS = ["Hello world, this is", "The quick brown fox jumps"]
LONG = " ".join(f"word{i}" for i in range(50))  # ~340 tokens: many KV blocks
AUTO_PROMPTS = {"law": "abcdefghij" * 3, "intent": "0123456789" * 3}  # what each task's requests look like
TASKS = {  # overlapping (law / intent share layer 0 expert 3) and disjoint (code) selections
    "law": {0: [3, 7], 1: [3], 2: [1, 2], 3: [7]},
    "intent": {0: [3, 9], 1: [4], 3: [0, 15]},
    "code": {2: [5], 3: [6]},
    "extra": {1: [8, 9], 2: [3]},  # registered, not served at start: loaded at run time
}


def test_default_bank_size_fits_any_resident_set_of_the_given_tasks(tmp_path):
    from expert_hub.models import describe_model
    from expert_hub.serving import bank_rows
    from expert_hub.serving.served_tasks import adapter_task

    path = str(build_tiny_model("qwen3_moe", tmp_path / "base", **SERVING_SHAPES["qwen3_moe"]))
    base, summary = load_base(path), describe_model(path)
    selections = {"a": {0: [0, 1, 2, 3, 4, 5], 1: [0]}, "b": {0: [6, 7, 8, 9, 10]}, "c": {1: [1, 2, 3, 4, 5, 6, 7]}}
    tasks = {
        name: adapter_task(
            name, ExpertAdapter.from_model(base, ExpertSelection(experts), task=name).save(tmp_path / name), summary
        )
        for name, experts in selections.items()
    }
    assert bank_rows(tasks, 16, max_resident=2) == 6 + 5  # layer 0 holds a and b at once
    assert bank_rows(tasks, 16, max_resident=1) == 7
    assert bank_rows({}, 16, max_resident=4) == 4  # a quarter of the experts: room for a task added later


def test_rows_are_written_in_the_gpu_kernel_layout_and_another_layout_is_caught():
    """vLLM's GPU experts keep w13 = [gate; up] rows, unpadded, and w2 = down (the CPU path is checked end to end)."""
    from expert_hub.serving.worker import check_row_layout

    gate, up, down = torch.randn(8, 16), torch.randn(8, 16), torch.randn(16, 8)
    expert = {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}
    layer = FakeBankedLayer(experts=2, spare=1)  # one device: the whole expert
    layer.w13_weight[0], layer.w2_weight[0] = torch.cat([gate, up]), down
    assert check_row_layout(layer, 2, 0, expert).status == "ok"
    assert not layer.w13_weight[2].any() and not layer.w2_weight[2].any()  # the spare row is cleared again
    layer.w13_weight[1], layer.w2_weight[1] = torch.cat([up, gate]), down  # a kernel keeping [up; gate]
    result = check_row_layout(layer, 2, 1, expert)
    assert result.status == "wrong_layout" and "layout the expert bank cannot write" in result.message


def test_a_tasks_rows_are_a_run_of_consecutive_free_rows_where_one_fits_and_are_written_exactly_anywhere():
    """The shortest run of free rows that holds the task (its rows then go in with one copy per weight), else the
    lowest free rows; either way each expert lands in its own row."""
    from expert_hub.serving.bank import take_rows
    from expert_hub.serving.vllm_contract import write_kernel_rows

    free = [4, 5, 7, 8, 9, 11]
    assert take_rows(free, 2) == [4, 5] and free == [7, 8, 9, 11]  # the run of 2, not the first 2 of the run of 3
    assert take_rows(free, 1) == [11] and take_rows(free, 3) == [7, 8, 9] and free == []
    free = [4, 6, 7, 9]
    assert take_rows(free, 3) == [4, 6, 7] and free == [9]  # no run holds 3
    layer = FakeBankedLayer(experts=4, spare=6)
    w13, w2 = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    write_kernel_rows(layer, [8, 4, 5, 7], (w13, w2))
    for source, row in enumerate([8, 4, 5, 7]):
        assert torch.equal(layer.w13_weight[row], w13[source]) and torch.equal(layer.w2_weight[row], w2[source])
    assert not layer.w13_weight[[0, 1, 2, 3, 6, 9]].any() and not layer.w2_weight[[0, 1, 2, 3, 6, 9]].any()


class _FailingRemap:
    """A GPU's remap table whose per-expert writes fail, as a device error would halfway through a load."""

    def __init__(self, remap: torch.Tensor):
        self.remap, self.shape, self.dtype, self.device = remap, remap.shape, remap.dtype, torch.device("cuda")

    def __setitem__(self, index, value):
        if isinstance(index, tuple):
            raise RuntimeError("device error")
        self.remap[index] = value


def _fake_adapter(directory: Path, experts: dict[int, list[int]]) -> Path:
    shapes = {"gate_proj": (8, 16), "up_proj": (8, 16), "down_proj": (16, 8)}
    tensors = {
        f"model.layers.{layer}.mlp.experts.{e}.{name}.weight": torch.randn(shape)
        for layer, ids in experts.items()
        for e in ids
        for name, shape in shapes.items()
    }
    return ExpertAdapter(ExpertSelection(experts), tensors).save(directory)


def test_a_task_load_is_all_or_nothing_and_unloading_leaves_nothing_behind(tmp_path):
    from expert_hub.serving import bank
    from expert_hub.serving.worker import ExpertBankWorker

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([FakeBankedLayer(), FakeBankedLayer()])
    worker = ExpertBankWorker()
    worker.model_runner = SimpleNamespace(model=model)
    snapshot = [(layer.w13_weight.clone(), layer.task_remap.clone(), sorted(layer.free_rows)) for layer in model.layers]

    def untouched() -> bool:
        return all(
            torch.equal(layer.w13_weight, w13)
            and torch.equal(layer.task_remap, remap)
            and sorted(layer.free_rows) == free
            and not layer.task_rows
            for layer, (w13, remap, free) in zip(model.layers, snapshot)
        )

    refused = worker.expert_hub_load_task("k1", str(_fake_adapter(tmp_path / "far", {0: [1, 2], 1: [5]})))
    assert (refused["status"], refused["row"], refused["message"]) == (
        "refused",
        None,
        "layer 1 has 4 experts; the task names expert 5",
    )  # the adapter is refused
    assert untouched() and "k1" not in bank.TASK_ROWS
    adapter = ExpertAdapter.load(_fake_adapter(tmp_path / "misshapen", {0: [1], 1: [2]}))
    adapter.tensors["model.layers.1.mlp.experts.2.up_proj.weight"] = torch.ones(7, 16)
    misshapen = adapter.save(tmp_path / "misshapen", overwrite=True)
    refused = worker.expert_hub_load_task("k1", str(misshapen))
    assert refused["status"] == "refused" and re.match(
        r"expert shapes \(8, 16\) / \(7, 16\) / \(16, 8\) do not fit", refused["message"]
    )
    assert untouched() and "k1" not in bank.TASK_ROWS
    good = _fake_adapter(tmp_path / "good", {0: [1, 2], 1: [3]})
    model.layers[1].task_remap = _FailingRemap(model.layers[1].task_remap)  # fails after layer 0 is written
    with pytest.raises(RuntimeError, match="device error"):
        worker.expert_hub_load_task("k2", str(good))
    model.layers[1].task_remap = model.layers[1].task_remap.remap
    assert untouched() and "k2" not in bank.TASK_ROWS
    try:
        loaded = worker.expert_hub_load_task("k3", str(good))
        assert loaded["status"] == "loaded"
        row = loaded["row"]
        adapter = ExpertAdapter.load(good)
        physical = int(model.layers[0].task_remap[row, 2])
        assert physical >= 4 and torch.equal(
            model.layers[0].w13_weight[physical],
            torch.cat(
                [
                    adapter.tensors["model.layers.0.mlp.experts.2.gate_proj.weight"],
                    adapter.tensors["model.layers.0.mlp.experts.2.up_proj.weight"],
                ]
            ),
        )
        assert worker.expert_hub_unload_task("k3")
        assert untouched()  # rows zeroed and free again, remap back to the base experts
    finally:
        bank.TASK_ROWS.pop("k3", None)


def test_a_worker_bound_to_one_core_reads_and_hashes_a_task_on_every_core_of_the_server(tmp_path, monkeypatch):
    """vLLM binds its CPU worker's threads to its compute cores (one of two here); a task load's reading and hashing
    threads must not take turns on that core alone."""
    from expert_hub import integrity
    from expert_hub.serving import bank, vllm_contract
    from expert_hub.serving.worker import ExpertBankWorker

    server = os.sched_getaffinity(0)
    assert len(server) > 1, "the CI machine has 2 cores"
    monkeypatch.setattr(vllm_contract, "server_cores", lambda: server)
    directory = _fake_adapter(tmp_path / "task", {0: [1, 2], 1: [3]})
    sha256 = {file.name: hashlib.sha256(file.read_bytes()).hexdigest() for file in directory.iterdir()}
    read_on, read_and_hash = [], integrity.read_and_hash

    def spied(path, digest):
        read_on.append(os.sched_getaffinity(0))  # the hashing thread it starts inherits this
        return read_and_hash(path, digest)

    monkeypatch.setattr(integrity, "read_and_hash", spied)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([FakeBankedLayer(), FakeBankedLayer()])
    worker = ExpertBankWorker()
    worker.model_runner = SimpleNamespace(model=model)

    def load_as_a_bound_worker() -> dict:
        os.sched_setaffinity(0, {min(server)})
        return worker.expert_hub_load_task("bound", str(directory), sha256)

    try:
        with ThreadPoolExecutor(1) as vllm_worker:
            assert vllm_worker.submit(load_as_a_bound_worker).result()["status"] == "loaded"
    finally:
        bank.TASK_ROWS.pop("bound", None)
    assert read_on and all(cores == server for cores in read_on)


def test_an_unsupported_vllm_or_a_moved_internal_is_named_in_one_line(monkeypatch):
    from expert_hub.serving import vllm_contract
    from expert_hub.serving.vllm_contract import UnsupportedVllmError

    vllm_contract.check_vllm_version()  # the installed one is supported
    monkeypatch.setattr(vllm_contract, "vllm_version", lambda: "0.35.0")
    with pytest.raises(
        UnsupportedVllmError,
        match=r"^vLLM 0.35.0 is installed; expert-hub serve supports vLLM "
        r">=0.32,<0.34$",
    ):
        vllm_contract.check_vllm_version()
    moved = "vllm.v1.kv_cache_interface:KVCacheConfig.moved_away"
    monkeypatch.setitem(vllm_contract.INTERNALS, "KV cache zeroing switch", moved)
    with pytest.raises(
        UnsupportedVllmError,
        match=r"^vLLM 0.35.0 has no `vllm.v1.kv_cache_interface.KVCacheConfig."
        r"moved_away`: expert-hub supports vLLM >=0.32,<0.34$",
    ):
        vllm_contract.enable_kv_cache_zeroing()


def test_bank_settings_travel_in_one_variable_and_plain_vllm_is_left_alone(monkeypatch):
    from expert_hub.serving.bank import BankSettings, register

    settings = BankSettings(extra_rows=None, bytes_per_layer=3 << 20, max_tasks=4, moe_layers=2, host_cache_bytes=5)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert BankSettings.from_env() == settings
    monkeypatch.delenv(BankSettings.ENV)
    assert BankSettings.from_env() is None
    register()  # no settings: returns before touching vLLM


def test_the_default_bank_holds_every_task_within_an_eighth_of_the_free_memory(monkeypatch, tmp_path):
    """Measured once by `serve` (every tensor-parallel rank gets the same rows), and the host-memory tier split
    between the ranks."""
    from expert_hub.models import describe_model
    from expert_hub.serving import ServeConfig, _bank_settings, engine
    from expert_hub.serving.bank import BankSettings
    from expert_hub.serving.served_tasks import Task
    from expert_hub.serving.vllm_contract import ExpertSizes

    path = str(build_tiny_model("qwen3_moe", tmp_path / "base", **SERVING_SHAPES["qwen3_moe"]))
    model, row = describe_model(path), 3 * 64 * 128 * 4  # one float32 expert of 4 layers: 96 KiB
    sizes, float32 = ExpertSizes(16, 64, 128, 0, 1), torch.float32
    monkeypatch.setattr(engine, "free_device_memory", lambda: 8 * 4 * 10 * row)  # an eighth: 10 rows in 4 layers
    tasks = {name: Task(name, tmp_path, 0, {0: 6, 1: 2}) for name in ("a", "b")}
    default = _bank_settings(model, tasks, ServeConfig(task_cache_gb=1.0), ranks=2)
    assert default.rows_per_layer(sizes, float32) == 10  # 12 wanted, 10 within an eighth of free memory
    assert default.host_cache_bytes == 2**29 and default.remap_rows(10) == 40
    one = _bank_settings(model, dict(list(tasks.items())[:1]), ServeConfig(), ranks=1)
    assert one.rows_per_layer(sizes, float32) == 6  # all it needs
    rows = _bank_settings(model, tasks, ServeConfig(expert_bank_rows=60, max_resident_tasks=3), ranks=1)
    assert rows.rows_per_layer(sizes, float32) == 60 and rows.remap_rows(60) == 3  # --expert-bank-rows, a cap
    gigabytes = BankSettings(None, 5 * row, None, 4)
    assert gigabytes.rows_per_layer(sizes, float32) == 5  # --expert-bank-gb


def test_the_kv_cache_on_cpu_holds_the_batch_within_half_the_free_memory():
    from expert_hub.errors import InvalidInputError
    from expert_hub.serving.engine import kv_cache_bytes

    model = SimpleNamespace(
        use_mla=False,
        max_model_len=512,
        dtype=torch.float32,
        get_num_kv_heads=lambda _: 2,
        get_head_size=lambda: 32,
        get_num_layers_by_block_type=lambda _, kind: 4,
    )
    config = SimpleNamespace(
        model_config=model,
        parallel_config=None,
        cache_config=SimpleNamespace(cache_dtype="auto"),
        scheduler_config=SimpleNamespace(max_num_seqs=128),
    )
    sequence = 512 * 2 * 2 * 32 * 4 * 4  # tokens x (K, V) x heads x head size x layers x float32: 1 MiB
    assert kv_cache_bytes(config, 2**40) == 128 * sequence  # the whole batch
    assert kv_cache_bytes(config, 64 * sequence) == 32 * sequence  # at most half the free memory
    assert kv_cache_bytes(config, 3 * sequence) == 2 * sequence  # at least two sequences
    with pytest.raises(InvalidInputError, match="a 512-token sequence needs 1.0 MiB of KV cache and only 1.5 MiB"):
        kv_cache_bytes(config, int(1.5 * sequence))
    assert kv_cache_bytes(config, 2**40, given=5 * sequence) == 5 * sequence  # --kv-cache-gb
    with pytest.raises(InvalidInputError, match="holds less than two 512-token sequences .2.0 MiB.: give a larger"):
        kv_cache_bytes(config, 2**40, given=sequence)
    with pytest.raises(InvalidInputError, match="more than the 4.0 MiB of memory free besides the weights"):
        kv_cache_bytes(config, 4 * sequence, given=5 * sequence)
    model.use_mla, model.get_num_kv_heads = True, lambda _: 1  # DeepSeek's latent cache: one vector per token
    assert kv_cache_bytes(config, 2**40) == 128 * sequence // 4


def _refused_serve(*args: str) -> str:
    """`expert-hub serve` with options it must refuse before vLLM starts: its one-line error."""
    command = [str(Path(sys.executable).with_name("expert-hub")), "serve", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_a_bank_too_small_for_one_expert_is_refused(tmp_path):
    base = build_tiny_model("qwen3_moe", tmp_path / "base", **SERVING_SHAPES["qwen3_moe"])
    error = _refused_serve(
        *("--base", str(base), "--expert-bank-gb", "0.00001", "--dtype", "float32"),
        *("--max-model-len", "256", "--enforce-eager", "--port", "8643"),
    )
    assert "error: the expert bank holds no expert: one expert row in every MoE layer takes 0.4 MiB" in error


def test_a_task_whose_routing_profile_is_not_a_distribution_stops_serve_before_the_engine(tmp_path):
    """One NaN share once made every auto request run on the base model; 1e30 made its task win every one."""
    base = build_tiny_model("qwen3_moe", tmp_path / "base", **SERVING_SHAPES["qwen3_moe"])
    adapter = ExpertAdapter.from_model(load_base(str(base)), ExpertSelection({0: [1]}), task="odd").save(
        tmp_path / "odd"
    )
    for share, message in ((float("nan"), "every share must be a finite number >= 0"), (1e30, "the shares sum to")):
        RoutingProfile({layer: [share] + [0.0] * 15 for layer in range(4)}, 8).save(adapter)
        error = _refused_serve("--base", str(base), "--tasks", f"odd={adapter}")
        assert f"routing_profile.json is not a valid routing profile: layer 0: {message}" in error


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-qwen")
    base, adapters, merged = make_tasks("qwen3_moe", root, TASKS)
    profile_tasks(base, adapters, AUTO_PROMPTS)  # law's requests are letters, intent's digits: they route apart
    registry = Registry(root / "registry")
    for name in ("law", "intent", "extra"):
        registry.register(adapters[name])
    prompts = [(p, 12) for p in PROMPTS + list(AUTO_PROMPTS.values())] + [(LONG, 6)]
    oracle = plain_vllm_tokens(root, {"base": base, **merged}, prompts)
    # Compiled (vLLM's default), unlike the deepseek server: the bank's remap and token tags must reach the graph.
    server = start_server(
        root, base, f"law,intent,code={adapters['code']}", root / "registry", 8641, ["--max-resident-tasks", "3"]
    )
    yield server, oracle, root
    server.process.terminate()
    server.process.wait(timeout=60)


def _expected(oracle, name: str, prompt: str) -> list[int]:
    asked = PROMPTS + list(AUTO_PROMPTS.values())
    index = asked.index(prompt) if prompt in asked else len(asked)
    return oracle[name][index]["token_ids"]


def test_each_task_alone_gives_its_merged_checkpoints_tokens(qwen):
    server, oracle, _ = qwen
    for name in ("base", "law", "intent", "code"):
        model = server.base if name == "base" else name
        for prompt in PROMPTS:
            result = server.complete(model, prompt, 12)
            assert result["token_ids"] == _expected(oracle, name, prompt), (name, prompt)
            assert result["model"] == model
    assert oracle["law"][0]["token_ids"] != oracle["base"][0]["token_ids"]  # the tasks really differ


def _all_at_once(server: Server, oracle, names: tuple[str, ...]) -> None:
    """Every task and the base, twice over, sent concurrently so they share batches: each its own tokens."""
    jobs = [(name, prompt) for name in names for prompt in PROMPTS] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(
            pool.map(lambda job: server.complete(server.base if job[0] == "base" else job[0], job[1], 12), jobs)
        )
    for (name, prompt), result in zip(jobs, results):
        assert result["token_ids"] == _expected(oracle, name, prompt), (name, prompt)


def test_all_tasks_and_the_base_share_batches(qwen):
    server, oracle, _ = qwen
    _all_at_once(server, oracle, ("base", "law", "intent", "code"))


def _matches_transformers(server: Server, oracle, root: Path, names: tuple[str, ...]) -> None:
    """Spot check outside vLLM: transformers `generate` on the base with the adapter applied, greedy, float32."""
    for name in names:
        model = load_model(str(root / "base"), root / f"adapter-{name}").eval()
        for index, prompt in enumerate(PROMPTS):
            served = server.complete(name, prompt, 12)
            with torch.no_grad():
                generated = model.generate(
                    torch.tensor([served["prompt_token_ids"]]), max_new_tokens=12, do_sample=False, min_new_tokens=12
                )
            expected = generated[0, len(served["prompt_token_ids"]) :].tolist()
            # Different kernels round differently: compare up to the first near-tie of the top two tokens.
            margins = oracle[name][index]["margins"]
            agree = next((i for i, margin in enumerate(margins) if margin < 1e-3), len(margins))
            assert agree >= 6 and served["token_ids"][:agree] == expected[:agree], (name, prompt)


def test_tasks_match_transformers_generation_with_the_adapter(qwen):
    server, oracle, root = qwen
    _matches_transformers(server, oracle, root, ("law", "code"))


def test_task_selection_by_body_field_and_header(qwen):
    server, oracle, _ = qwen
    by_body = server.complete(server.base, PROMPTS[0], 12, task="intent")
    assert by_body["token_ids"] == _expected(oracle, "intent", PROMPTS[0])
    status, body = server.request(
        "POST",
        "/v1/completions",
        {"model": server.base, "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "return_token_ids": True},
        headers={"x-expert-task": "code"},
    )
    assert status == 200 and body["choices"][0]["token_ids"] == _expected(oracle, "code", PROMPTS[1])


def test_auto_runs_the_task_whose_routing_profile_the_prompt_matches(qwen):
    """`"model": "auto"` (or `X-Expert-Task: auto`) gives exactly the named task's tokens, and says which ran; a
    prompt with nothing to route is a 400, logged without a traceback."""
    server, oracle, root = qwen
    counted = server.counters()
    for task, prompt in AUTO_PROMPTS.items():
        by_model = server.complete("auto", prompt, 12)
        assert by_model["model"] == task and by_model["token_ids"] == _expected(oracle, task, prompt)
        request = urllib.request.Request(
            server.url + "/v1/completions",
            data=json.dumps({"model": server.base, "prompt": prompt, "max_tokens": 12, "temperature": 0}).encode(),
            headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}", "x-expert-task": "auto"},
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            assert response.headers["x-expert-task-chosen"] == task
            assert json.loads(response.read())["model"] == task
    status, text = server.request("GET", "/metrics")
    assert 'expert_hub_auto_routed_requests_total{task="law"} 2.0' in text.decode()
    assert (
        server.counters()['expert_hub_task_requests_total{task="law"}']
        == counted.get('expert_hub_task_requests_total{task="law"}', 0) + 2
    )
    for path, body, headers, message in (
        ("/v1/completions", {"model": "auto", "prompt": "", "max_tokens": 2}, {}, "the prompt is empty"),
        ("/v1/completions", {"model": "auto", "prompt": " \n ", "max_tokens": 2}, {}, "the prompt is empty"),
        ("/v1/completions", b'{"model": "auto", "prompt": "ab\\ud800", "max_tokens": 2}', {}, "a lone surrogate"),
        ("/v1/completions", {"model": "auto", "prompt": [True, False], "max_tokens": 2}, {}, "a list of token ids"),
        ("/v1/completions", {"model": "auto", "prompt": ["a", "b"], "max_tokens": 2}, {}, "one prompt per request"),
        ("/v1/completions", [1, 2], {"x-expert-task": "auto"}, "the request body must be a JSON object"),
        ("/tokenize", {"model": "auto", "prompt": "abc"}, {}, "auto routing serves POST /v1/chat/completions and"),
    ):
        status, answer = server.request("POST", path, body, headers=headers)
        assert status == 400 and message in answer["error"]["message"], answer
    assert "Traceback" not in (root / "server.log").read_text()


def _auto_completion(server: Server, prompt: str) -> tuple[int, str | None, dict]:
    """A `"model": "auto"` completion: its status, the task the server says it chose, and the body."""
    request = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps(
            {"model": "auto", "prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
        ).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.headers["x-expert-task-chosen"], json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers["x-expert-task-chosen"], json.loads(error.read())


def test_auto_requests_racing_a_delete_run_on_what_is_there(qwen):
    """While law is removed and added again, auto requests for law's prompts run on law or on the base model, say
    which in the header, and the counters count what ran. (On this tiny model a DELETE seldom lands in the moment
    between routing and running; that moment is `test_an_auto_request_whose_task_was_removed_meanwhile_...`.)"""
    server, oracle, _ = qwen
    prompt, before, answers = AUTO_PROMPTS["law"], server.counters(), []
    with ThreadPoolExecutor(4) as pool:
        for _ in range(6):
            asked = [pool.submit(_auto_completion, server, prompt) for _ in range(4)]
            time.sleep(0.005)
            server.request("DELETE", "/v1/tasks/law")  # 409 once a request runs on law
            answers += [future.result() for future in asked]
            assert server.request("POST", "/v1/tasks/law")[0] == 200
    ran = {"law": 0, "base": 0}
    for status, chosen, body in answers:
        assert status == 200, body
        name = "law" if chosen == "law" else "base"
        assert chosen == body["model"] == ("law" if name == "law" else server.base)
        assert body["choices"][0]["token_ids"] == _expected(oracle, name, prompt)
        ran[name] += 1
    after = server.counters()
    for name, count in ran.items():
        key = f'expert_hub_auto_routed_requests_total{{task="{name}"}}'
        assert after.get(key, 0) - before.get(key, 0) == count, name


def test_a_task_whose_routing_profile_does_not_fit_is_refused_and_auto_goes_on(qwen):
    server, oracle, root = qwen
    registry = Registry(root / "registry")
    shutil.copytree(root / "adapter-law", root / "misprofiled")
    RoutingProfile({0: [0.5, 0.5]}, 1).save(root / "misprofiled")  # a distribution, but not over this model's experts
    registry.register(root / "misprofiled", task="misprofiled")
    status, body = server.request("POST", "/v1/tasks/misprofiled")
    assert (
        status == 422 and "the routing profile's layers (0) are not the model's MoE layers" in body["error"]["message"]
    )
    assert str(registry.root) not in body["error"]["message"]
    assert server.complete("auto", AUTO_PROMPTS["law"], 12)["token_ids"] == _expected(
        oracle, "law", AUTO_PROMPTS["law"]
    )


def test_prefix_caching_never_mixes_tasks(qwen):
    """The same long prompt (many KV blocks) for law, then intent, then the base: each gets its own tokens."""
    server, oracle, _ = qwen
    for name in ("law", "intent", "base", "law"):
        result = server.complete(server.base if name == "base" else name, LONG, 6)
        expected = oracle[name][len(PROMPTS) + len(AUTO_PROMPTS)]
        assert result["token_ids"] == expected["token_ids"], name
        assert result["logprobs"] == pytest.approx(expected["logprobs"], abs=1e-4), name


def test_the_openai_client(qwen):
    from openai import BadRequestError, NotFoundError, OpenAI

    server, _, _ = qwen
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    listed = {model.id: model for model in client.models.list().data}
    assert {server.base, "law", "intent", "code"} <= set(listed) and "extra" not in listed  # not served yet
    assert listed["law"].model_dump()["parent"] == server.base
    completion = client.completions.create(model="law", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert completion.model == "law" and completion.choices[0].text
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="law", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True
        )
    )
    assert streamed == completion.choices[0].text
    chat = client.chat.completions.create(
        model="intent", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    chunks = client.chat.completions.create(
        model="intent", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert (
        client.completions.create(
            model=server.base, prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"task": "law"}
        )
        .choices[0]
        .text
        == completion.choices[0].text
    )
    with pytest.raises(BadRequestError, match="several tasks"):  # two tasks named: refused, not guessed
        client.completions.create(model="law", prompt="x", max_tokens=2, extra_body={"task": "code"})
    with pytest.raises(NotFoundError):
        client.completions.create(model="no-such-task", prompt="x", max_tokens=2)


def test_bad_requests_get_the_right_4xx(qwen):
    server, oracle, _ = qwen
    status, body = server.request("POST", "/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 2})
    assert status == 404 and body["error"]["type"] == "NotFoundError" and "nope" in body["error"]["message"]
    status, body = server.request("POST", "/v1/completions", b"{not json")
    assert status == 400 and "error" in body
    status, body = server.request("POST", "/v1/completions", {"model": "law", "prompt": "word " * 400, "max_tokens": 4})
    assert status == 400 and "error" in body
    assert server.request("POST", "/v1/completions", {"model": "law", "prompt": "x"}, key=None)[0] == 401
    assert server.request("POST", "/v1/completions", {"model": "law", "prompt": "x"}, key="wrong")[0] == 401
    assert server.request("POST", "/v1/tasks/extra", key=None)[0] == 401
    assert server.request("GET", "/v1/models", key="wrong")[0] == 401
    assert server.complete("law", PROMPTS[0], 12)["token_ids"] == _expected(oracle, "law", PROMPTS[0])


def test_task_listing_shows_residency_and_the_bank(qwen):
    server, _, _ = qwen
    status, listing = server.request("GET", "/v1/tasks")
    assert status == 200 and {"law", "intent", "code"} <= {task["id"] for task in listing["data"]}
    law = next(task for task in listing["data"] if task["id"] == "law")
    assert law["bytes"] > 0 and law["in_flight"] == 0 and law["load_seconds"] is not None
    bank = listing["bank"]  # default size: the 3 resident tasks' experts per layer, at least E/4 = 4 rows
    assert bank["layers"] == 4 and bank["rows_per_layer"] == 4 and bank["layout_checked"]
    assert bank["bytes"] == 4 * bank["bytes_per_row"] == 4 * 4 * 3 * 128 * 64 * 4  # float32 gate, up, down
    assert server.request("GET", "/v1/tasks", key=None)[0] == 401


def test_per_task_counters_in_metrics(qwen):
    from openai import OpenAI

    server, _, _ = qwen
    before = server.counters()
    prompt_tokens = len(server.complete("law", PROMPTS[0], 5, ignore_eos=True)["prompt_token_ids"])
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    chunks = list(
        client.completions.create(
            model="intent", prompt=PROMPTS[0], max_tokens=7, stream=True, extra_body={"ignore_eos": True}
        )
    )  # usage not asked for in the stream
    assert all(chunk.choices for chunk in chunks) and not any(chunk.usage for chunk in chunks)
    after = server.counters()
    assert {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)} == {
        'expert_hub_task_requests_total{task="law"}': 1,
        'expert_hub_task_requests_total{task="intent"}': 1,
        'expert_hub_task_prompt_tokens_total{task="law"}': prompt_tokens,
        'expert_hub_task_prompt_tokens_total{task="intent"}': prompt_tokens,
        'expert_hub_task_completion_tokens_total{task="law"}': 5,
        'expert_hub_task_completion_tokens_total{task="intent"}': 7,
    }


def test_tampered_registry_entries_are_never_loaded(qwen):
    server, _, root = qwen
    registry = Registry(root / "registry")
    entry = registry.register(root / "adapter-code", task="damaged")
    stored = registry.object_path(entry) / "experts.safetensors"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    status, body = server.request("POST", "/v1/tasks/damaged")
    assert status == 422 and "experts.safetensors" in body["error"]["message"]
    assert str(registry.root) not in body["error"]["message"]  # no server paths in answers to clients


def test_loading_and_unloading_while_other_tasks_run(qwen):
    """Runs last: it changes which tasks the server has."""
    server, oracle, _ = qwen
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(server.complete, "law", prompt, 12) for prompt in PROMPTS * 2]
        status, body = server.request("POST", "/v1/tasks/extra")  # 4th task, 3 resident: evicts an idle one
        assert status == 200 and body["resident"] and body["bytes"] > 0
        extra = server.complete("extra", PROMPTS[0], 12)
        for future, prompt in zip(running, PROMPTS * 2):
            assert future.result()["token_ids"] == _expected(oracle, "law", prompt)
    assert extra["token_ids"] == _expected(oracle, "extra", PROMPTS[0])
    for name in ("code", "intent", "law"):  # whichever was evicted reloads on demand, unchanged
        assert server.complete(name, PROMPTS[1], 12)["token_ids"] == _expected(oracle, name, PROMPTS[1])
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(server.complete, "code", LONG, 48)
        time.sleep(0.3)
        status, body = server.request("DELETE", "/v1/tasks/code")
        assert status in (200, 409)  # 409 while its request is in flight, never a broken request
        busy.result()
    status, body = server.request("DELETE", "/v1/tasks/code")
    assert status == 200 or (status == 404 and "code" in body["error"]["message"])
    assert server.request("POST", "/v1/completions", {"model": "code", "prompt": "x", "max_tokens": 2})[0] == 404


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-deepseek")
    tasks = {"law": {1: [3, 7], 2: [0], 3: [15]}, "intent": {1: [3], 3: [2, 4]}}
    base, adapters, merged = make_tasks("deepseek_v2", root, tasks)
    (base / "chat_template.jinja").unlink()  # a base without a chat template, as the demo base
    oracle = plain_vllm_tokens(root, {"base": base, **merged}, [(p, 12) for p in PROMPTS])
    # 0.0014 GiB over 3 MoE layers = 5 rows of 96 KiB experts per layer
    server = start_server(
        root,
        base,
        ",".join(f"{n}={p}" for n, p in adapters.items()),
        root / "registry",
        8642,
        ["--expert-bank-gb", "0.0014", "--enforce-eager"],
    )
    yield server, oracle, root
    server.process.terminate()
    server.process.wait(timeout=60)


def test_deepseek_v2_tasks_match_their_merged_checkpoints(deepseek):
    server, oracle, _ = deepseek
    for name in ("base", "law", "intent"):
        for prompt in PROMPTS:
            result = server.complete(server.base if name == "base" else name, prompt, 12)
            assert result["token_ids"] == _expected(oracle, name, prompt), (name, prompt)
    assert oracle["law"][0]["token_ids"] != oracle["base"][0]["token_ids"]


def test_deepseek_v2_tasks_match_transformers_generation_with_the_adapter(deepseek):
    server, oracle, root = deepseek
    _matches_transformers(server, oracle, root, ("law", "intent"))


def test_training_format_as_chat_template_renders_as_training_formats():
    """What `serve` gives vLLM for a base without a chat template: every conversation renders to `prompt_ids`."""
    from expert_hub.data import REFERENCE_CHAT_TEMPLATE, prompt_ids
    from expert_hub.demo import demo_base
    from expert_hub.models import load_tokenizer

    conversations = [
        [{"role": "user", "content": " What is 3 + 4? "}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        [
            {"role": "user", "content": "Translate: the red farmer"},
            {"role": "assistant", "content": "gorun zeki\n\n"},
            {"role": "user", "content": "and the farmers?"},
        ],
    ]
    for tokenizer in (load_tokenizer(demo_base()), byte_tokenizer()):
        for messages in conversations:
            text = tokenizer.apply_chat_template(
                messages, chat_template=REFERENCE_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
            )
            assert tokenizer.encode(text, add_special_tokens=False) == prompt_ids(messages, tokenizer), messages


def test_chat_on_a_base_without_a_chat_template_runs_in_the_training_format(deepseek):
    """vLLM refuses chat on a base without a template; `serve` gives it the training format instead."""
    from expert_hub.data import prompt_ids

    server, _, _ = deepseek
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}]
    expected = prompt_ids(messages, byte_tokenizer())
    request = {"model": "law", "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    status, chat = server.request("POST", "/v1/chat/completions", request | {"messages": messages})
    assert status == 200, chat
    status, completion = server.request("POST", "/v1/completions", request | {"prompt": expected})
    assert status == 200 and chat["prompt_token_ids"] == expected
    assert chat["choices"][0]["token_ids"] == completion["choices"][0]["token_ids"]


def test_the_bank_is_sized_in_gigabytes(deepseek):
    server, _, _ = deepseek
    bank = server.request("GET", "/v1/tasks")[1]["bank"]
    assert (bank["layers"], bank["rows_per_layer"], bank["bytes_per_row"]) == (3, 5, 3 * 3 * 128 * 64 * 4)


def test_deepseek_v2_tasks_and_the_base_share_batches(deepseek):
    server, oracle, _ = deepseek
    _all_at_once(server, oracle, ("base", "law", "intent"))


def test_a_full_bank_evicts_an_idle_task_and_a_task_larger_than_the_bank_is_refused(deepseek):
    """Runs last for deepseek: 5 rows per layer; law and intent use 3 of layer 1's, `wide` needs 4 there."""
    server, oracle, root = deepseek
    registry = Registry(root / "registry")
    model = load_base(server.base)
    for name, experts in (("wide", {1: [0, 1, 2, 4]}), ("huge", {1: [0, 1, 2, 4, 5, 6]})):
        registry.register(ExpertAdapter.from_model(model, ExpertSelection(experts), task=name).save(root / name))
    for name in ("law", "intent"):  # law becomes the least recently used; evicting it frees enough of layer 1
        server.complete(name, PROMPTS[0], 2)
    status, body = server.request("POST", "/v1/tasks/wide")
    assert status == 200 and body["resident"], body
    resident = {task["id"] for task in server.request("GET", "/v1/tasks")[1]["data"] if task["resident"]}
    assert resident == {"wide", "intent"}
    status, body = server.request("POST", "/v1/tasks/huge")
    assert (
        status == 507
        and "6 experts in layer 1" in body["error"]["message"]
        and "5 per layer" in body["error"]["message"]
    )
    for name in ("law", "intent"):  # the evicted one reloads (evicting another idle task) with the same tokens
        assert server.complete(name, PROMPTS[0], 12)["token_ids"] == _expected(oracle, name, PROMPTS[0])


def test_a_damaged_registry_is_a_server_error_that_names_no_path(tmp_path, registry_home, caplog):
    """A task added at run time from a registry whose index is damaged: a 500, not 'no such task' or 'bad name'."""
    from expert_hub.models import describe_model
    from expert_hub.serving.manager import TaskManager
    from expert_hub.serving.served_tasks import TaskError

    base = str(build_tiny_model("qwen3_moe", tmp_path / "base", **SERVING_SHAPES["qwen3_moe"]))
    registry_home.mkdir()
    (registry_home / "index.json").write_text('{"entries": [')  # cut short by a full disk
    manager = TaskManager(None, {}, describe_model(base), Registry(), base)
    with pytest.raises(TaskError) as refused:
        manager.source.registered("law")
    assert (
        refused.value.status == 500
        and str(refused.value) == "cannot look up task 'law': the server's registry is damaged"
    )
    assert str(registry_home) in caplog.text  # the operator's log says which file
