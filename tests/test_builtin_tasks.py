"""Built-in tasks and the demo base: what a first-time user runs with no --base and no --data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from expert_hub.demo import DEMO_BASE
from expert_hub.evaluation import SCORERS, evaluate_records
from expert_hub.models import base_metadata
from expert_hub.tasks import BUILTIN_TASKS, export

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_export_is_deterministic_and_splits_are_disjoint(name, tmp_path):
    first, again, other = (
        export(name, tmp_path / "a"),
        export(name, tmp_path / "b"),
        export(name, tmp_path / "c", seed=1),
    )
    task = BUILTIN_TASKS[name]
    for split, size in (("train", task.train_size), ("eval", task.eval_size)):
        assert first[split].read_bytes() == again[split].read_bytes()
        assert first[split].read_bytes() != other[split].read_bytes()
        assert len(first[split].read_text().splitlines()) == size
    questions = {
        split: {json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines()}
        for split, path in first.items()
    }
    assert not questions["train"] & questions["eval"]


@pytest.mark.parametrize("name", [name for name, task in BUILTIN_TASKS.items() if task.metric != "loss"])
def test_each_metric_rewards_the_right_answer_and_not_a_wrong_one(name):
    task = BUILTIN_TASKS[name]
    answers = [[record["answers"][0]] for record in task.eval_records(50)]
    right = [refs[0] for refs in answers]
    wrong = right[1:] + right[:1]  # every answer given to the next question
    perfect = 100.0 if task.metric == "bleu" else 1.0
    assert SCORERS[task.metric](right, answers) == pytest.approx(perfect)
    assert SCORERS[task.metric](wrong, answers) < 0.5 * perfect


def test_generic_text_uses_the_held_out_words_but_never_their_answers():
    """The demo base may know a held-out task's words (ESFT cannot teach new ones) but not its answers."""
    generic = " ".join(m["content"] for c in BUILTIN_TASKS["general"].examples("train", 3000) for m in c)
    held_out = [name for name, task in BUILTIN_TASKS.items() if not task.in_demo_base]
    for name in held_out:
        conversations = BUILTIN_TASKS[name].examples("eval", 100)
        answers = {c[-1]["content"] for c in conversations}
        assert not [answer for answer in answers if answer in generic], name
        assert not [c[0]["content"] for c in conversations if c[0]["content"] in generic], name
    for word in (
        "verdict",
        "prison",
        "warning",
        "offence",
        "weapon",
        "intent",
        "slots",
        "alarm",
        "nina simone",
        "sailor",
        "quiet",
        "carried",
        '{"title": ',
    ):
        assert word in generic.lower(), word
    assert '"intent":' not in generic and "Give the verdict" not in generic and "Velan" not in generic


def test_known_answers_score_as_expected():
    law = [["Verdict: fine. Reason: low value, not returned."]]
    assert SCORERS["exact"](["Verdict: fine. Reason: low value, not returned."], law) == 1.0
    assert SCORERS["exact"](["Verdict: warning. Reason: low value, first offence, returned."], law) == 0.0
    intent = [['{"intent": "set_alarm", "slots": {"time": "7 am", "day": "monday"}}']]
    assert SCORERS["intent"](['{"intent": "set_alarm", "slots": {"day": "monday", "time": "7 am"}}'], intent) == 1.0
    assert SCORERS["intent"](['{"intent": "set_alarm", "slots": {"time": "8 am", "day": "monday"}}'], intent) == 0.0


def test_the_demo_base_ships_in_the_package_and_knows_its_pretraining_tasks():
    from expert_hub.models import load_base, load_tokenizer

    metadata = base_metadata(str(DEMO_BASE))
    assert metadata["recipe"]["seed"] and metadata["seconds"] > 0
    assert sorted(metadata["recipe"]["held_out"]) == sorted(n for n, t in BUILTIN_TASKS.items() if not t.in_demo_base)
    assert (DEMO_BASE / "model.safetensors").stat().st_size < 30 * 2**20
    model, tokenizer = load_base(str(DEMO_BASE)), load_tokenizer(str(DEMO_BASE))
    math = BUILTIN_TASKS["math"]  # the pretraining task it has learned best (see expert_hub_base.json)
    result = evaluate_records(
        model, tokenizer, math.eval_records(20), math.metric, max_new_tokens=math.max_new_tokens, batch_size=20
    )
    assert result["value"] >= 0.8, result["examples"]
    law = BUILTIN_TASKS["law"]
    held_out = evaluate_records(
        model, tokenizer, law.eval_records(20), law.metric, max_new_tokens=law.max_new_tokens, batch_size=20
    )
    assert held_out["value"] < 0.5  # something left for ESFT to teach


def test_tasks_lists_and_exports(run_cli, tmp_path):
    code, out, _ = run_cli("tasks")
    assert code == 0
    for name, task in BUILTIN_TASKS.items():
        assert name in out and task.metric in out
    assert "held out" in out and "pretrained on" in out
    code, out, _ = run_cli("tasks", "export", "intent", tmp_path / "intent")
    assert code == 0 and (tmp_path / "intent/train.jsonl").is_file() and (tmp_path / "intent/eval.jsonl").is_file()
    code, _, err = run_cli("tasks", "export", "poetry", tmp_path / "x")
    assert code == 1 and "no built-in task 'poetry'" in err and "law" in err


def test_inspect_with_no_argument_describes_the_demo_base(run_cli):
    code, out, _ = run_cli("inspect")
    assert code == 0 and "deepseek_v2" in out and str(DEMO_BASE) in out
    code, out, _ = run_cli("inspect", "--json")
    summary = json.loads(out)
    assert summary["num_experts"] == 64 and summary["top_k"] == 6 and summary["shared_experts"]


@pytest.mark.slow
def test_train_law_with_no_base_or_data_uses_the_demo_base_and_its_defaults(run_cli, tmp_path):
    out = tmp_path / "law"
    code, stdout, err = run_cli("train", "--task", "law", "--steps", "3", "--out", out)
    assert code == 0, err
    config = json.loads((out / "train_config.json").read_text())
    defaults = base_metadata(str(DEMO_BASE))["training_defaults"]
    assert config["base"] == str(DEMO_BASE) and config["steps"] == 3  # given: wins over the base's default
    assert config["seq_len"] == defaults["seq_len"] and config["learning_rate"] == defaults["learning_rate"]
    assert config["top_p"] == defaults["top_p"] and config["save_every"] == defaults["save_every"]
    assert Path(config["data"]).name == "train.jsonl" and "Registered law@1" in stdout
    code, stdout, _ = run_cli("train", "--help")  # and --help says what they are
    assert f"the demo base: {defaults['steps']}]" in re.sub(r"[│\s]+", " ", stdout)

    code, stdout, err = run_cli("eval", "--adapter", "law", "--limit", "4", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["metric"] == "exact" and result["count"] == 4 and result["data"].endswith("eval.jsonl")


def test_a_task_that_is_not_built_in_needs_data(run_cli, tmp_path, tiny_models):
    code, _, err = run_cli("train", "--task", "poems", "--out", tmp_path / "p")
    assert code == 1 and "give --data FILE ('poems' is not a built-in task" in err
    # a base without expert_hub_base.json keeps the reference defaults
    code, _, err = run_cli(
        "train",
        "--task",
        "law",
        "--base",
        tiny_models["qwen3_moe"],
        "--steps",
        "1",
        "--out",
        tmp_path / "q",
        "--score-tokens",
        "64",
        "--seq-len",
        "64",
        "--no-register",
    )
    assert code == 0, err
    config = json.loads((tmp_path / "q/train_config.json").read_text())
    assert config["learning_rate"] is None and config["grad_accumulation"] == 16


def test_the_wheel_carries_the_demo_base_and_the_task_generators(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("expert_hub-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "expert_hub/demo/base/model.safetensors",
        "expert_hub/demo/base/tokenizer.json",
        "expert_hub/demo/base/config.json",
        "expert_hub/demo/base/expert_hub_base.json",
        "expert_hub/tasks/generators.py",
        "expert_hub/cli/quickstart.py",
    ):
        assert required in names
