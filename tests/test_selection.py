"""ESFT's top-p selection and the expert_cfg.json schema."""

from __future__ import annotations

import json
import logging

import pytest

from expert_hub.errors import InvalidInputError
from expert_hub.scores import ExpertScores
from expert_hub.selection import ExpertSelection, select_experts

TASKS = ("law", "intent", "summary", "translation")


@pytest.mark.parametrize("task", TASKS)
def test_published_scores_reproduce_the_published_expert_configs(esft_data, task):
    scores = ExpertScores.load(esft_data / f"expert_scores/{task}/summary.json")
    selection = select_experts(scores, by="token", top_p=0.2)
    assert selection.to_json() == json.loads((esft_data / f"expert_configs/{task}.json").read_text())


def _scores(values: dict[int, float]) -> ExpertScores:
    return ExpertScores(token_scores={5: values}, gate_scores={5: {e: v / 2 for e, v in values.items()}})


def test_the_expert_that_crosses_p_is_included():
    scores = _scores({0: 0.05, 1: 0.5, 2: 0.3, 3: 0.15})
    assert select_experts(scores, "token", 0.5).experts == {5: [1]}
    assert select_experts(scores, "token", 0.51).experts == {5: [1, 2]}
    assert select_experts(scores, "token", 1.0).experts == {5: [1, 2, 3, 0]}


def test_gate_scores_default_to_the_papers_p():
    scores = _scores({0: 0.1, 1: 0.5, 2: 0.3, 3: 0.1})  # gate scores are half: 0.05, 0.25, 0.15, 0.05
    assert select_experts(scores, "gate").experts == {5: [1]}
    assert select_experts(scores, "token").experts == {5: [1]}
    assert select_experts(scores, "gate", 0.3).experts == {5: [1, 2]}


@pytest.mark.parametrize("top_p", [0, -0.1, 1.01])
def test_top_p_outside_the_unit_interval_is_refused(top_p):
    with pytest.raises(InvalidInputError, match="top-p"):
        select_experts(_scores({0: 1.0}), "token", top_p)


def test_unknown_score_function_is_refused():
    with pytest.raises(InvalidInputError, match="score function"):
        select_experts(_scores({0: 1.0}), "loss")


def test_selection_round_trips_and_validates(tmp_path):
    selection = ExpertSelection({3: [4, 1], 1: [0]}, shared_experts=True)
    selection.save(tmp_path / "cfg.json")
    assert ExpertSelection.load(tmp_path / "cfg.json") == selection
    assert selection.pairs == [(1, 0), (3, 4), (3, 1)]
    for bad in ({"experts": [1, 2]}, {"experts": {"1": [2, 2]}}, {"experts": {"1": [1]}, "shared_experts": "yes"}):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(InvalidInputError):
            ExpertSelection.load(tmp_path / "bad.json")


def test_empty_scores_are_refused():
    with pytest.raises(InvalidInputError, match="no layers"):
        select_experts(ExpertScores(token_scores={}, gate_scores={}))
    with pytest.raises(InvalidInputError, match="layer 5 has no scores"):
        select_experts(_scores({0: 0.0, 1: 0.0}))


@pytest.mark.parametrize("ids", ['"12"', "[1.5]", "[true]"])
def test_expert_ids_must_be_integers(tmp_path, ids):
    (tmp_path / "cfg.json").write_text(f'{{"experts": {{"1": {ids}}}}}')
    with pytest.raises(InvalidInputError, match="integer ids"):
        ExpertSelection.load(tmp_path / "cfg.json")


def test_a_gate_p_above_a_layers_gate_mass_warns_once(esft_data, caplog):
    """DeepSeek-V2-Lite's gate scores sum to 0.26-0.53 per layer: p = 0.6 would silently select every expert."""
    scores = ExpertScores.load(esft_data / "expert_scores/law/summary.json")
    with caplog.at_level(logging.WARNING, logger="expert_hub.selection"):
        selection = select_experts(scores, "gate", 0.6)
    assert all(len(ids) == 64 for ids in selection.experts.values())
    [record] = caplog.records
    assert "top-p 0.6 exceeds the total gate score of 26 layers (1: 0." in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="expert_hub.selection"):
        select_experts(scores, "gate", 0.1)
        select_experts(scores, "token", 0.6)  # token scores sum to 1
    assert not caplog.records


def test_the_cli_shows_the_gate_mass_warning_on_stderr_in_one_line(run_cli, esft_data, tmp_path, monkeypatch):
    monkeypatch.setattr(logging.root, "handlers", [])  # as outside pytest, where the CLI configures no logging
    summary = esft_data / "expert_scores/law/summary.json"
    code, _, err = run_cli("select", summary, "--by", "gate", "--top-p", "0.6", "-o", tmp_path / "cfg.json")
    assert code == 0 and err.startswith("warning: top-p 0.6 exceeds") and err.count("\n") == 1, err
    code, _, err = run_cli("select", summary, "--by", "gate", "-o", tmp_path / "cfg.json")
    assert code == 0 and not err
