"""The local registry: versions and references, integrity, names, crash and concurrency safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from expert_hub import ExpertAdapter, ExpertSelection, load_model
from expert_hub.errors import InvalidInputError
from expert_hub.models import load_base
from expert_hub.registry import Registry, RegistryError


@pytest.fixture
def adapters(tiny_models, tmp_path):
    """Two different trained-looking adapters of the qwen3_moe tiny model."""
    base = tiny_models["qwen3_moe"]
    made = {}
    for seed, (task, selection) in enumerate({"law": {1: [2, 5]}, "intent": {0: [1], 3: [7]}}.items(), start=1):
        adapter = ExpertAdapter.from_model(load_base(str(base)), ExpertSelection(selection), task=task)
        generator = torch.Generator().manual_seed(seed)
        adapter.tensors = {k: torch.randn(v.shape, generator=generator) for k, v in adapter.tensors.items()}
        made[task] = adapter.save(tmp_path / f"adapter-{task}")
    return base, made


def test_versions_and_references(adapters, registry_home):
    base, made = adapters
    registry = Registry()
    first = registry.register(made["law"])
    assert registry.register(made["law"]) == first  # the bytes the newest version holds: no new version
    second = registry.register(made["intent"], task="law")
    other = registry.register(made["intent"])
    third = registry.register(made["law"])  # an older version's bytes: a new version, so `law` means them
    assert (first.ref, second.ref, other.ref, third.ref) == ("law@1", "law@2", "intent@1", "law@3")
    assert first.digest == third.digest and first.base_model == str(base)
    assert registry.resolve("law").version == 3
    assert registry.resolve("law@1").version == 1
    assert registry.resolve(f"law@{first.digest[:6]}").version == 3  # same content: the newest version
    assert [e.ref for e in registry.entries(base=str(base))] == ["law@1", "law@2", "intent@1", "law@3"]
    assert registry.entries(base="someone/else") == []
    with pytest.raises(RegistryError, match="no registered task 'law@7'"):
        registry.resolve("law@7")
    with pytest.raises(InvalidInputError, match="hex digits"):
        registry.resolve("law@xyz!")
    assert [e.ref for e in registry.remove("law@1")] == ["law@1"]
    assert registry.verify(registry.resolve("law")).is_dir()  # the shared object outlived law@1
    registry.remove("law")
    assert [e.ref for e in registry.entries()] == ["intent@1"]
    assert len(list((registry_home / "objects").iterdir())) == 1


def test_an_all_digit_hash_prefix_still_resolves(registry_home):
    """sha256 prefixes are sometimes all digits: a selector that is no version number is tried as a hash."""
    entry = {"task": "law", "version": 1, "base_model": None, "digest": "1234567" + "a" * 57, "created": "now"}
    registry_home.mkdir()
    (registry_home / "index.json").write_text(json.dumps({"entries": [entry]}))
    assert Registry().resolve("law@1234567").version == 1
    assert Registry().resolve("law@1").version == 1
    with pytest.raises(RegistryError):
        Registry().resolve("law@123")  # too short for a hash, and no version 123


def test_load_model_takes_a_registry_reference(adapters, tmp_path):
    base, made = adapters
    Registry().register(made["law"])
    input_ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        from_registry = load_model(str(base), "law")(input_ids).logits
        from_directory = load_model(str(base), made["law"])(input_ids).logits
    assert torch.equal(from_registry, from_directory)
    exported = Registry().export("law", tmp_path / "exported")
    for name in ("expert_cfg.json", "expert_hub.json", "experts.safetensors"):
        assert (exported / name).read_bytes() == (made["law"] / name).read_bytes()


def test_tampering_is_detected_and_named(adapters, registry_home):
    base, made = adapters
    entry = Registry().register(made["law"])
    stored = registry_home / "objects" / entry.digest / "experts.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=f"law@1: file {stored} does not match its recorded sha256"):
        load_model(str(base), "law")
    stored.unlink()
    with pytest.raises(RegistryError, match="missing file .*experts.safetensors"):
        Registry().load("law")
    entry = Registry().register(made["law"])  # registering the same content again repairs the object
    assert Registry().load(entry.ref).selection.pairs == [(1, 2), (1, 5)]


@pytest.mark.parametrize("name", ["../x", "", "/etc/passwd", "a/b/c", "a/..", "..", "a b", "-x", "x/../../y"])
def test_bad_names_are_refused(adapters, name):
    _, made = adapters
    with pytest.raises(InvalidInputError, match="invalid task name"):
        Registry().register(made["law"], task=name)
    with pytest.raises(InvalidInputError, match="invalid task name"):
        Registry().resolve(name)


def test_namespaced_names_and_the_cli(adapters, run_cli, tmp_path):
    _, made = adapters
    code, out, err = run_cli("import", made["law"], "--task", "acme/law")
    assert code == 0 and "acme/law@1" in out, err
    code, out, _ = run_cli("list", "--json")
    assert [entry["task"] for entry in json.loads(out)] == ["acme/law"]
    code, out, _ = run_cli("show", "acme/law@1", "--json")
    assert json.loads(out)["selection"]["experts"] == {"1": [2, 5]}
    code, out, _ = run_cli("export", "acme/law", tmp_path / "out")
    assert code == 0 and (tmp_path / "out" / "experts.safetensors").is_file()
    code, _, err = run_cli("rm", "acme/law@9")
    assert code == 1 and err.startswith("error: no registered task 'acme/law@9'")
    code, out, _ = run_cli("rm", "acme/law")
    assert code == 0 and "Removed acme/law@1" in out


_IMPORT_LOOP = """
import sys
from expert_hub.registry import Registry
for round in range(int(sys.argv[3])):
    Registry().register(sys.argv[1], task=f"{sys.argv[2]}-{round}")
"""


def test_concurrent_imports_from_two_processes_all_land(adapters, registry_home):
    _, made = adapters
    rounds = 12
    processes = [
        subprocess.Popen([sys.executable, "-c", _IMPORT_LOOP, str(made[task]), task, str(rounds)])
        for task in ("law", "intent")
    ]
    assert [process.wait(timeout=300) for process in processes] == [0, 0]
    assert sorted(e.task for e in Registry().entries()) == sorted(
        f"{task}-{round}" for task in ("law", "intent") for round in range(rounds)
    )
    assert len(list((registry_home / "objects").iterdir())) == 2


def test_a_killed_import_leaves_the_registry_as_it_was(adapters, registry_home):
    _, made = adapters
    Registry().register(made["intent"])
    padding = made["law"] / "padding.bin"  # make the copy take long enough to be killed in the middle
    with padding.open("wb") as handle:
        handle.truncate(768 * 2**20)
    victim = subprocess.Popen([sys.executable, "-c", _IMPORT_LOOP, str(made["law"]), "law", "1"])
    staging = registry_home / "staging"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if staging.is_dir() and any((path / "padding.bin").exists() for path in staging.iterdir()):
            break
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert [e.ref for e in Registry().entries()] == ["intent@1"], "the import finished before it was killed"
    assert len(list((registry_home / "objects").iterdir())) == 1
    padding.unlink()
    assert Registry().register(made["law"]).ref == "law@1"
    assert list(staging.iterdir()) == []  # the killed import's leftovers are gone
    assert len(os.listdir(registry_home / "objects")) == 2


def test_import_refuses_weights_that_are_not_finite(adapters, run_cli, registry_home):
    from safetensors.torch import load_file, save_file

    _, made = adapters
    weights = made["law"] / "experts.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    code, _, err = run_cli("import", made["law"])
    assert (
        code == 1
        and err.strip() == f"error: experts.safetensors: {key} holds NaN or infinite values (did training diverge?)"
    )
    assert Registry(registry_home).entries() == []


def test_import_refuses_a_routing_profile_that_is_not_a_distribution(adapters, run_cli, registry_home):
    """A hostile profile (one share of 1e30) would win every auto request wherever the version is served."""
    _, made = adapters
    profile = {"format": "expert-hub.routing-profile/1", "tokens": 10, "shares": {"0": [1e30] + [0.0] * 7}}
    (made["law"] / "routing_profile.json").write_text(json.dumps(profile))
    code, _, err = run_cli("import", made["law"])
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {made['law'] / 'routing_profile.json'} is not a valid routing profile: layer 0:")
    assert Registry(registry_home).entries() == []


def _write_index(home, *records) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "index.json").write_text(json.dumps({"entries": list(records)}))


def test_rm_never_deletes_outside_the_store(adapters, run_cli, registry_home, tmp_path):
    """index.json is untrusted: a digest that climbs out of objects/ makes the record unusable, never a path."""
    _, made = adapters
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    hostile = {"task": "law", "version": 1, "base_model": None, "digest": "../../victim", "created": "now"}
    _write_index(registry_home, hostile)
    code, _, err = run_cli("rm", "law")
    assert code == 1 and err.startswith("error: no registered task 'law'")
    code, out, err = run_cli("list")
    assert code == 0 and "No task experts registered" in out
    assert "skipped" in err and "entry 1 has digest '../../victim', which is not a sha256" in err
    entry = Registry().register(made["law"])  # the store keeps working, and keeps the record it cannot read
    assert Registry().remove(entry.ref) == [entry]
    assert json.loads((registry_home / "index.json").read_text())["entries"] == [hostile]
    assert (victim / "precious.txt").read_text() == "keep me"


def test_one_bad_entry_does_not_hide_the_others(adapters, run_cli, registry_home):
    _, made = adapters
    good = Registry().register(made["law"])
    index = json.loads((registry_home / "index.json").read_text())
    bad_metrics = dict(index["entries"][0], task="intent", metrics={"loss": "high"})
    bad_method = dict(index["entries"][0], task="summary", method={"a": 1})
    _write_index(registry_home, *index["entries"], bad_metrics, bad_method, None, {"task": "x"})
    code, out, err = run_cli("list", "--json")
    assert code == 0 and [e["task"] for e in json.loads(out)] == ["law"]
    assert [line.split(" entry ")[1][:1] for line in err.splitlines()] == ["2", "3", "4", "5"]
    assert "metrics = {'loss': 'high'}" in err and "is NoneType, not an object" in err and "lacks version" in err
    code, out, _ = run_cli("show", good.ref)
    assert code == 0 and "law@1" in out
    for shape in ([], None, {"entries": {"a": 1}}):
        (registry_home / "index.json").write_text(json.dumps(shape))
        code, _, err = run_cli("list")
        assert code == 1 and err.count("\n") == 1 and "is not a registry index" in err


def test_import_refuses_metadata_of_the_wrong_types(adapters, run_cli, registry_home):
    _, made = adapters
    metadata_path = made["law"] / "expert_hub.json"
    original = json.loads(metadata_path.read_text())
    for field, value in (
        ("method", {"a": 1}),
        ("metrics", {"loss": "high"}),
        ("metrics", {"loss": True}),
        ("top_p", "0.2"),
        ("versions", [1]),
    ):
        metadata_path.write_text(json.dumps(original | {field: value}))
        code, _, err = run_cli("import", made["law"])
        assert code == 1 and err.count("\n") == 1 and f"{field} = {value!r}" in err, err
    (made["law"] / "expert_cfg.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli("import", made["law"])
    assert code == 1 and err.strip().endswith("expert_cfg.json is nested too deeply to be expert-hub JSON")
    assert Registry().entries() == []


def test_import_refuses_symlinks_and_special_files(adapters, run_cli, registry_home, tmp_path):
    """A link would be copied into the store, and `push` would publish what it points at."""
    _, made = adapters
    secret = tmp_path / "secret.txt"
    secret.write_text("api key")
    (made["law"] / "notes.txt").symlink_to(secret)
    code, _, err = run_cli("import", made["law"])
    assert (
        code == 1
        and err.strip()
        == f"error: {made['law'] / 'notes.txt'} is a symlink; an adapter directory holds regular files only"
    )
    (made["law"] / "notes.txt").unlink()
    os.mkfifo(made["law"] / "pipe")
    code, _, err = run_cli("import", made["law"])
    assert code == 1 and "pipe is not a regular file" in err
    assert Registry().entries() == [] and not (registry_home / "objects").exists()


@pytest.mark.parametrize("ref", ["law@", "law@¹", "law@٣", "law@12ab!", "law@" + "a" * 65])
def test_selectors_that_are_neither_versions_nor_hashes_are_refused(adapters, run_cli, ref):
    _, made = adapters
    Registry().register(made["law"])
    code, _, err = run_cli("show", ref)
    assert (
        code == 1
        and err.strip() == f"error: {ref!r}: after '@' give a version number or at least 4 hex digits of a hash"
    )


def test_a_full_disk_names_the_store(adapters, run_cli, registry_home, monkeypatch):
    import errno

    _, made = adapters

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    code, _, err = run_cli("import", made["law"])
    assert code == 1 and err.strip() == f"error: [Errno 28] No space left on device: '{registry_home}'"
    assert not (registry_home / "index.json").exists() and list((registry_home / "staging").iterdir()) == []


def test_a_piped_listing_is_never_cut(adapters, registry_home):
    """`expert-hub list | cat`: whole rows, whatever the width of a terminal would be."""
    base, made = adapters
    Registry().register(made["law"], task="a-rather-long-namespace/and-an-even-longer-task-name-for-the-law")
    environment = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    listing = subprocess.run(
        [sys.executable, "-m", "expert_hub.cli", "list"], capture_output=True, text=True, timeout=120, env=environment
    )
    row = next(line for line in listing.stdout.splitlines() if "and-an-even-longer" in line)
    assert "a-rather-long-namespace/and-an-even-longer-task-name-for-the-law" in row and str(base) in row


def test_import_finds_the_adapter_in_a_run_directory(adapters, run_cli, tmp_path):
    _, made = adapters
    run = tmp_path / "runs" / "law-esft-token"
    run.mkdir(parents=True)
    made["law"].rename(run / "adapter")
    (run / "train_config.json").write_text("{}")
    code, out, err = run_cli("import", run)
    assert code == 0 and "Registered law@1" in out, err


def test_a_damaged_registry_is_not_called_invalid_input_and_keeps_its_cause(adapters, registry_home):
    from expert_hub.errors import ExpertHubError
    from expert_hub.registry import RegistryDamagedError

    _, made = adapters
    entry = Registry().register(made["law"])
    (registry_home / "objects" / entry.digest / "expert_cfg.json").write_text("{}")
    with pytest.raises(RegistryDamagedError) as damaged:
        Registry().load("law")
    assert not isinstance(damaged.value, InvalidInputError) and isinstance(damaged.value, ExpertHubError)
    assert isinstance(damaged.value.__cause__, RegistryDamagedError)  # the check that failed, for library users
    with pytest.raises(RegistryError) as missing:  # a reference that matches nothing is the caller's
        Registry().resolve("tax")
    assert not isinstance(missing.value, RegistryDamagedError)


def test_an_index_that_is_not_json_is_damage(registry_home):
    from expert_hub.registry import RegistryDamagedError

    registry_home.mkdir()
    (registry_home / "index.json").write_text('{"entries": [')
    with pytest.raises(RegistryDamagedError, match="is not valid JSON.*move it aside and re-import the adapters"):
        Registry().entries()


def _record_opens(monkeypatch) -> list[tuple[str, str]]:
    """Every (path, how) opened from Python or by safetensors, which reads files outside Python's `open`."""
    from pathlib import Path

    from expert_hub import adapter as adapter_module

    opened = []
    path_open, safe_open = Path.open, adapter_module.safe_open

    def recording_open(self, mode="r", *args, **kwargs):
        opened.append((str(self.resolve()), mode))
        return path_open(self, mode, *args, **kwargs)

    def recording_safe_open(file, *args, **kwargs):
        opened.append((str(Path(file).resolve()), "safe_open"))
        return safe_open(file, *args, **kwargs)

    monkeypatch.setattr(Path, "open", recording_open)
    monkeypatch.setattr(adapter_module, "safe_open", recording_safe_open)
    return opened


def test_an_import_reads_each_source_file_once(adapters, monkeypatch):
    """One read of every source byte: the copy is hashed as it is written, and the copy, not the source, is checked."""
    _, made = adapters
    opened = _record_opens(monkeypatch)
    Registry().register(made["law"])
    sources = sorted(str(path.resolve()) for path in made["law"].iterdir())
    assert sorted(path for path, _ in opened if path in sources) == sources
    assert all(how == "rb" for path, how in opened if path in sources)


def test_a_source_changed_between_the_check_and_the_copy_cannot_slip_in(adapters, monkeypatch, registry_home):
    """Whatever is stored is what was checked: weights turned NaN while an import runs are refused."""
    from safetensors.torch import load_file, save_file

    from expert_hub import integrity

    _, made = adapters
    weights = made["law"] / "experts.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    copy_and_hash = integrity.copy_and_hash

    def tampered_before_copying(source, target):
        if source == weights:
            save_file(tensors, weights)
        return copy_and_hash(source, target)

    monkeypatch.setattr(integrity, "copy_and_hash", tampered_before_copying)
    with pytest.raises(InvalidInputError, match=f"experts.safetensors: {key} holds NaN or infinite values"):
        Registry().register(made["law"])
    assert Registry().entries() == [] and list((registry_home / "staging").iterdir()) == []


def test_errors_about_the_staged_copy_name_the_source(adapters):
    _, made = adapters
    (made["law"] / "expert_cfg.json").unlink()
    with pytest.raises(InvalidInputError) as refused:
        Registry().register(made["law"])
    assert str(refused.value) == f"{made['law']} is not an expert adapter: it has no expert_cfg.json"


def _flip_first_byte(data: bytearray) -> bytearray:  # the safetensors header's length
    data[0] ^= 0x01
    return data


def _flip_last_byte(data: bytearray) -> bytearray:  # a weight
    data[-1] ^= 0xFF
    return data


TAMPERS = [_flip_first_byte, _flip_last_byte, lambda data: data[:-2], lambda data: data + b"x"]


@pytest.mark.parametrize("tamper", TAMPERS)
@pytest.mark.parametrize("path", ["load", "verify", "export"])
def test_a_tampered_stored_file_is_refused_on_every_path_that_reads_it(adapters, registry_home, tmp_path, tamper, path):
    """`load`, `verify` (used by load_model, serve and push) and `export`, whichever byte changed."""
    from expert_hub.registry import RegistryDamagedError

    _, made = adapters
    entry = Registry().register(made["law"])
    stored = registry_home / "objects" / entry.digest / "experts.safetensors"
    stored.write_bytes(bytes(tamper(bytearray(stored.read_bytes()))))
    read = {
        "load": lambda: Registry().load("law"),
        "verify": lambda: Registry().verify(entry),
        "export": lambda: Registry().export("law", tmp_path / "exported"),
    }[path]
    with pytest.raises(RegistryDamagedError, match=f"law@1: file {stored} does not match its recorded sha256"):
        read()
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("tamper", TAMPERS)
def test_a_task_the_server_loads_is_hashed_from_the_bytes_it_loads(adapters, registry_home, tamper):
    """The server's worker reads a registry task once: `ExpertAdapter.load` with the manifest's recorded hashes."""
    from expert_hub.registry import RegistryDamagedError

    _, made = adapters
    entry = Registry().register(made["law"])
    path, hashes = Registry().object_path(entry), Registry().file_hashes(entry)
    intact = ExpertAdapter.load(path, hashes)
    expected = Registry().load("law").tensors
    assert intact.tensors.keys() == expected.keys()
    assert all(torch.equal(intact.tensors[key], expected[key]) for key in expected)
    unlisted = {name: digest for name, digest in hashes.items() if not name.endswith(".safetensors")}
    with pytest.raises(InvalidInputError, match="^experts.safetensors is not one of the adapter's recorded files$"):
        ExpertAdapter.load(path, unlisted)
    stored = path / "experts.safetensors"
    stored.write_bytes(bytes(tamper(bytearray(stored.read_bytes()))))
    with pytest.raises(InvalidInputError, match="^experts.safetensors does not match its recorded sha256"):
        ExpertAdapter.load(path, hashes)
    (path / "manifest.json").write_text((path / "manifest.json").read_text() + " ")
    with pytest.raises(RegistryDamagedError, match="law@1: .*manifest.json was modified"):
        Registry().file_hashes(entry)


def test_the_task_name_auto_is_reserved_for_auto_routing(adapters, run_cli, registry_home):
    """`"model": "auto"` asks the server to choose a task: a task of that name could never be asked for."""
    _, made = adapters
    message = 'error: the task name "auto" is reserved: "model": "auto" asks the server to choose a task'
    for args in (
        ("import", made["law"], "--task", "auto"),
        ("train", "--task", "auto"),
        ("profile", "auto"),
        ("show", "auto"),
    ):
        code, _, err = run_cli(*args)
        assert code == 1 and err.strip() == message, (args, err)
    metadata = made["law"] / "expert_hub.json"
    metadata.write_text(json.dumps(json.loads(metadata.read_text()) | {"task": "auto"}))
    code, _, err = run_cli("import", made["law"])  # the adapter's own name
    assert code == 1 and err.strip() == message
    assert Registry().entries() == []
    # registered before the name was reserved: skipped (so `serve --all-tasks` starts), named, and how to keep it
    kept = Registry().register(made["intent"])
    record = json.loads((registry_home / "index.json").read_text())["entries"][0]
    _write_index(registry_home, record, dict(record, task="auto"))
    code, out, err = run_cli("list", "--json")
    assert code == 0 and [entry["task"] for entry in json.loads(out)] == ["intent"]
    assert 'entry 2 is task "auto"' in err and f"expert-hub import objects/{kept.digest} --task NAME" in err
    assert [entry.ref for entry in Registry().entries()] == ["intent@1"]


def test_a_base_moved_after_its_tasks_were_registered_keeps_them(
    adapters, run_cli, registry_home, tmp_path, monkeypatch
):
    """A local base is known by its fingerprint, computed once per version of its files; its path is only a hint."""
    from safetensors.torch import load_file, save_file

    from expert_hub.registry import bases

    base, made = adapters
    fingerprinted, fingerprint = [], bases.base_fingerprint
    monkeypatch.setattr(bases, "base_fingerprint", lambda path: fingerprinted.append(path) or fingerprint(path))
    here = shutil.copytree(base, tmp_path / "here")
    registry = Registry()
    assert registry.register(made["law"], base=str(here)).ref == "law@1"
    moved = here.rename(tmp_path / "moved")
    assert registry.resolve("law", base=str(moved)).ref == "law@1"
    load_model(str(moved), "law")
    assert registry.register(made["intent"], task="law", base=str(moved)).ref == "law@2"  # the same base
    assert len(fingerprinted) == 2  # once per place, however often it is asked for
    code, out, err = run_cli("show", "law@1", "--base", str(here))  # the path `list` shows still names it
    assert code == 0 and "law@1" in out, err
    (registry_home / "bases.json").write_text("{")  # the cache is only a cache
    assert registry.resolve("law", base=str(moved)).ref == "law@2" and len(fingerprinted) == 3
    weights = moved / "model.safetensors"
    tensors = load_file(weights)
    tensors[sorted(tensors)[0]] += 1
    save_file(tensors, weights, metadata={"format": "pt"})  # other weights: another base, though at the same path
    code, _, err = run_cli("show", "law", "--base", str(moved))
    assert code == 1 and err.count("\n") == 1 and f"it is registered for {here} (fingerprint" in err
    assert len(fingerprinted) == 4


def test_entries_keyed_by_path_find_their_base_once_it_moved(adapters, registry_home, tmp_path):
    """An index written when a local base was known by its path: each such entry is known by what its path holds,
    kept from the next write of the index on, so the base may then move."""
    base, made = adapters
    here = shutil.copytree(base, tmp_path / "here")
    Registry().register(made["law"], base=str(here))
    record = json.loads((registry_home / "index.json").read_text())["entries"][0]
    _write_index(registry_home, {key: value for key, value in record.items() if key != "base_fingerprint"})
    assert Registry().resolve("law", base=str(here)).ref == "law@1"
    Registry().register(made["intent"], base=str(base))  # any write
    moved = here.rename(tmp_path / "moved")
    assert Registry().resolve("law", base=str(moved)).ref == "law@1"


def test_demo_tasks_are_found_from_another_install_of_the_package(tmp_path):
    """The package installed in another environment (or the repository cloned elsewhere) has its own demo base."""
    from expert_hub.demo import demo_base

    adapter = ExpertAdapter.from_model(load_base(demo_base()), ExpertSelection({1: [0]}), task="law")
    Registry().register(adapter.save(tmp_path / "law"), base=demo_base())
    elsewhere = shutil.copytree(demo_base(), tmp_path / "other-env/site-packages/expert_hub/demo/base")
    assert Registry().resolve("law", base=str(elsewhere)).ref == "law@1"
