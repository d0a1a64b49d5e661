"""`expert-hub analyze`: the paper's figures from the published scores, and how far a trained adapter's experts moved."""

from __future__ import annotations

import json
import math

import pytest
import torch

from expert_hub import ExpertAdapter, load_model
from expert_hub.analysis import concentration, jaccard, overlap, routing_shares, weight_change
from expert_hub.errors import AdapterMismatchError
from expert_hub.families import moe_layers, read_expert
from expert_hub.models import load_base
from expert_hub.registry import Registry
from expert_hub.scores import ExpertScores
from expert_hub.selection import ExpertSelection
from expert_hub.testing import build_tiny_model
from expert_hub.training import train

from .test_training import _config

TASKS = ("intent", "law", "summary", "translation")
PNG = b"\x89PNG\r\n\x1a\n"


def _published(esft_data) -> dict[str, ExpertScores]:
    return {task: ExpertScores.load(esft_data / "expert_scores" / task / "summary.json") for task in TASKS}


def test_the_published_scores_give_the_papers_figures(run_cli, tmp_path, esft_data):
    out = tmp_path / "analysis"
    code, stdout, err = run_cli("analyze", *(esft_data / "expert_scores" / t for t in TASKS), "--out", out, "--json")
    assert code == 0, err
    numbers = json.loads(stdout)
    files = numbers.pop("files")
    assert numbers == json.loads((out / "analysis.json").read_text())  # the same numbers, kept with the figures
    assert [path.rsplit("/", 1)[1] for path in files] == [
        "heatmap.png",
        "concentration.png",
        "overlap.png",
        "analysis.json",
    ]
    for name in ("heatmap.png", "concentration.png", "overlap.png"):
        assert (out / name).read_bytes()[:8] == PNG and (out / name).stat().st_size > 10_000, name
    assert not (out / "weight_change.png").exists()  # no adapters given
    assert list(numbers["tasks"]) == list(TASKS) and numbers["score"] == "token" and numbers["top_p"] == 0.2

    for task, scores in _published(esft_data).items():
        entry = numbers["tasks"][task]
        assert len(entry["shares"]) == 26 and {len(row) for row in entry["shares"].values()} == {64}
        for layer, row in entry["shares"].items():
            assert math.isclose(sum(row), 1.0, abs_tol=1e-9)
            published = scores.token_scores[int(layer)]  # already shares, up to the 4-decimal rounding
            assert max(abs(share - published[e]) for e, share in enumerate(row)) < 1e-3
        published_config = json.loads((esft_data / "expert_configs" / f"{task}.json").read_text())
        assert entry["selection"] == published_config["experts"]  # ESFT-Token, p = 0.2
        assert entry["concentration"]["levels"] == [0.5, 0.8, 0.95]
        result = entry["concentration"]
        assert all(uniform == [32, 52, 61] for uniform in result["uniform"].values())  # ceil(level x 64)
        for counts in result["experts"].values():  # monotone in the level, and routing is concentrated
            assert counts == sorted(counts) and all(n < uniform for n, uniform in zip(counts, [32, 52, 61]))

    matrix = numbers["overlap"]["jaccard"]
    assert numbers["overlap"]["tasks"] == list(TASKS)
    assert all(matrix[i][i] == 1.0 for i in range(len(TASKS)))
    assert all(matrix[i][j] == matrix[j][i] and 0 <= matrix[i][j] < 0.5 for i in range(4) for j in range(4) if i != j)


def test_tables_name_the_tasks_and_the_overlap(run_cli, tmp_path, esft_data):
    law, intent = (esft_data / "expert_scores" / t / "summary.json" for t in ("law", "intent"))
    code, out, err = run_cli("analyze", law, intent, "--out", tmp_path)
    assert code == 0, err
    assert "Routing concentration (token scores)" in out and "19.3 (32)" in out  # law needs 19.3 experts for 50%
    assert "153 (5.9 per layer)" in out and "Overlap (Jaccard)" in out and "0.03" in out
    assert "Wrote heatmap.png, concentration.png, overlap.png, analysis.json" in out


@pytest.mark.parametrize("by", ["token", "gate"])
def test_published_routing_is_concentrated(esft_data, by):
    """The paper's first observation, on its own data: far fewer experts than uniform routing needs, every layer."""
    for task, scores in _published(esft_data).items():
        result = concentration(scores, by)
        assert len(result.experts) == 26
        for layer, counts in result.experts.items():
            assert 1 <= counts[0] <= counts[1] <= counts[2] <= 64, (task, layer)
            assert all(count < uniform for count, uniform in zip(counts, result.uniform[layer])), (task, layer)
        assert result.mean()[0] < 20  # half the tokens go to under a third of the 64 experts


def test_concentration_counts_and_normalises_gate_scores():
    scores = ExpertScores(
        token_scores={3: {0: 0.5, 1: 0.3, 2: 0.1, 3: 0.1}},
        gate_scores={3: {0: 0.2, 1: 0.12, 2: 0.04, 3: 0.04}},  # the same shares of a 0.4 gate mass
    )
    for by in ("token", "gate"):
        assert routing_shares(scores, by)[3] == pytest.approx([0.5, 0.3, 0.1, 0.1])
        result = concentration(scores, by)
        assert result.experts == {3: [1, 2, 4]} and result.uniform == {3: [2, 4, 4]}


def test_overlap_is_the_jaccard_similarity_of_the_selected_pairs():
    first, second = ExpertSelection({1: [0, 1], 2: [5]}), ExpertSelection({1: [1, 2], 2: [5]})
    assert overlap({"a": first, "b": second}) == [[1.0, 0.5], [0.5, 1.0]]  # {(1,1), (2,5)} of 4 pairs
    assert jaccard(set(), set()) == 1.0


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.json", None, "missing.json is not a file, a folder or a registered task"),
        ("folder", "", "folder holds neither summary.json (scores) nor expert_cfg.json (an expert adapter)"),
        ("bad.json", "{}", "bad.json is not an expert scores file"),
    ],
)
def test_a_bad_source_is_one_line_error(run_cli, tmp_path, esft_data, name, content, message):
    source = tmp_path / name
    if content == "":
        source.mkdir()
    elif content:
        source.write_text(content)
    code, out, err = run_cli("analyze", esft_data / "expert_scores/law", source, "--out", tmp_path / "out")
    assert code != 0 and out == "" and not (tmp_path / "out").exists()
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


# A tiny trained adapter


@pytest.fixture(scope="module")
def trained(tmp_path_factory, esft_data):
    """A qwen3_moe adapter trained 2 steps on the law data (ESFT-Token, p = 0.2), with the run's scores."""
    root = tmp_path_factory.mktemp("trained")
    base = build_tiny_model("qwen3_moe", root / "base")
    config = _config(
        base,
        esft_data / "datasets/train/law.jsonl",
        root / "run",
        steps=2,
        grad_accumulation=1,
        score_tokens=1000,
        save_every=2,
        eval_every=2,
        eval_fraction=0,
    )
    result = train(config)
    return base, result.artifact, root / "run" / "scores.json"


def _independent_weight_change(base, artifact) -> dict[tuple[int, int], float]:
    """Every expert of the model, trained model against base, from the fused tensors (not the adapter's file)."""
    before, after = load_base(str(base)), load_model(str(base), artifact)
    changes = {}
    for old, new in zip(moe_layers(before), moe_layers(after)):
        for expert in range(old.num_experts):
            a, b = read_expert(old.experts, expert), read_expert(new.experts, expert)
            moved = sum(float((b[n].double() - a[n].double()).square().sum()) for n in a)
            size = sum(float(a[n].double().square().sum()) for n in a)
            changes[(old.index, expert)] = math.sqrt(moved / size)
    return changes


def test_weight_change_of_a_trained_adapter(run_cli, tmp_path, trained):
    base, artifact, scores = trained
    out = tmp_path / "analysis"
    code, stdout, err = run_cli("analyze", scores, artifact, "--base", base, "--out", out, "--json")
    assert code == 0, err
    numbers = json.loads(stdout)
    assert list(numbers["tasks"]) == ["scores", "law"]  # the score file's stem, the adapter's task
    adapter = ExpertAdapter.load(artifact)
    law = numbers["tasks"]["law"]
    assert law["selection"] == adapter.selection.to_json()["experts"] and "shares" not in law
    # the run selected from these very scores, with the same rule
    assert numbers["tasks"]["scores"]["selection"] == law["selection"]
    assert numbers["overlap"]["jaccard"] == [[1.0, 1.0], [1.0, 1.0]]

    reported = {
        (int(layer), int(e)): value for layer, experts in law["weight_change"].items() for e, value in experts.items()
    }
    independent = _independent_weight_change(base, artifact)
    selected = set(adapter.selection.pairs)
    assert set(reported) == selected
    assert {pair for pair, value in independent.items() if value > 0} == selected  # the others did not move at all
    for pair, value in reported.items():
        assert value == pytest.approx(independent[pair], rel=1e-9)
    for name in ("heatmap.png", "concentration.png", "overlap.png", "weight_change.png"):
        assert (out / name).read_bytes()[:8] == PNG, name

    code, out_text, err = run_cli("analyze", artifact, "--base", base, "--out", tmp_path / "tables")
    assert code == 0, err
    assert "Relative weight change of the trained experts" in out_text and "law" in out_text


def test_a_registered_task_scored_on_its_data(run_cli, tmp_path, trained, esft_data):
    base, artifact, _ = trained
    Registry().register(artifact)
    data = esft_data / "datasets/train/law.jsonl"
    code, stdout, err = run_cli(
        "analyze", "law", "--base", base, "--data", data, "--tokens", 600, "--seq-len", 64, "--json", "--out", tmp_path
    )
    assert code == 0, err
    law = json.loads(stdout)["tasks"]["law"]
    assert law["selection"] == ExpertAdapter.load(artifact).selection.to_json()["experts"]
    assert len(law["shares"]) == 4 and all(math.isclose(sum(row), 1.0) for row in law["shares"].values())
    assert all(len(counts) == 3 for counts in law["concentration"]["experts"].values())
    assert law["weight_change"]

    code, _, err = run_cli("analyze", "law", "--data", data, "--out", tmp_path)
    assert code != 0 and err == "error: --data is scored on a model: give --base MODEL too\n"


def test_weight_change_needs_the_adapters_own_base(tmp_path, trained):
    _, artifact, _ = trained
    other = load_base(str(build_tiny_model("qwen3_moe", tmp_path / "other", seed=1)))
    with pytest.raises(AdapterMismatchError, match="differ from those the adapter was trained on"):
        weight_change(ExpertAdapter.load(artifact), other)
    assert torch.is_grad_enabled()  # the no_grad decorator did not leak
